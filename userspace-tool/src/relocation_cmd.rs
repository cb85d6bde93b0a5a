//! Waiting for relocations (`volume move`, `pool evacuate`, `volume mirror add`) with a
//! progress bar per volume, fed by the server's status of each copy.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use sanblk_proto::protocol::{RecoveryList, RecoveryState, RecoveryStatus};

use crate::context::{CliError, Context};

/// How often the server is asked for progress.
const POLL: Duration = Duration::from_millis(250);

/// Whether a status is final.
fn finished(state: RecoveryState) -> bool {
    matches!(
        state,
        RecoveryState::Done | RecoveryState::Failed | RecoveryState::Cancelled
    )
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("#>.")
}

/// Follows the relocations of `volume_ids` until each one ends, drawing progress bars on a
/// terminal (nothing otherwise); prints one line per volume at the end. Fails if any failed.
pub async fn follow(context: &mut Context, volume_ids: &[u64]) -> Result<(), CliError> {
    let bars = MultiProgress::new();
    let mut shown: Vec<(u64, ProgressBar)> = Vec::new();
    let finals: Vec<RecoveryStatus> = loop {
        let statuses: Vec<RecoveryStatus> = context.call(RecoveryList {}).await?;
        let mine: Vec<&RecoveryStatus> = statuses
            .iter()
            .filter(|s| volume_ids.contains(&s.volume_id))
            .collect();
        for status in &mine {
            let bar = match shown.iter().find(|(id, _)| *id == status.volume_id) {
                Some((_, bar)) => bar.clone(),
                None => {
                    let bar = bars.add(ProgressBar::new(status.bytes_total));
                    bar.set_style(bar_style());
                    bar.set_prefix(status.volume_name.clone());
                    shown.push((status.volume_id, bar.clone()));
                    bar
                }
            };
            bar.set_length(status.bytes_total);
            bar.set_position(status.bytes_done);
            bar.set_message(status.state.to_string());
        }
        if mine.len() == volume_ids.len() && mine.iter().all(|s| finished(s.state)) {
            break mine.into_iter().cloned().collect();
        }
        tokio::time::sleep(POLL).await;
    };
    for (_, bar) in &shown {
        bar.finish_and_clear();
    }
    if context.json {
        context.print_json(&finals)?;
    } else {
        for status in &finals {
            println!(
                "{}: {} {} ({})",
                status.volume_name, status.kind, status.state, status.message
            );
        }
    }
    let failed: Vec<String> = finals
        .iter()
        .filter(|s| s.state == RecoveryState::Failed)
        .map(|s| format!("{}: {}", s.volume_name, s.message))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::Refused(failed.join("; ")))
    }
}

/// After relocations off `device` started: follows them, or with `no_wait` prints their first
/// status; says so when the device held no data.
pub async fn follow_started(
    context: &mut Context,
    device: &str,
    statuses: &[RecoveryStatus],
    no_wait: bool,
) -> Result<(), CliError> {
    if statuses.is_empty() {
        if context.json {
            return context.print_json(&statuses);
        }
        println!("device {device} holds no volume data");
        return Ok(());
    }
    if no_wait {
        return print_started(context, statuses);
    }
    let ids: Vec<u64> = statuses.iter().map(|s| s.volume_id).collect();
    follow(context, &ids).await
}

/// Prints the first status of relocations started without waiting.
pub fn print_started(context: &Context, statuses: &[RecoveryStatus]) -> Result<(), CliError> {
    if context.json {
        return context.print_json(&statuses);
    }
    for status in statuses {
        println!(
            "{}: {} started ({}); follow it with `sanctl volume show {}`",
            status.volume_name, status.kind, status.message, status.volume_name
        );
    }
    Ok(())
}

//! `sanctl recovery ...`: data being moved off failed devices.

use clap::Subcommand;
use sanblk_proto::map::format_size;
use sanblk_proto::protocol::{RecoveryList, RecoveryStart, RecoveryStatus};

use crate::context::{CliError, Context};
use crate::output::print_table;

#[derive(Debug, Subcommand)]
pub enum RecoveryCommand {
    /// List recoveries, moves and mirror adds (running, failed, or finished since the server
    /// started) with progress.
    #[command(after_help = "Example:\n  sanctl recovery list\n  sanctl --json recovery list")]
    List,
    /// Declare a device failed and recover every volume's data off it, live.
    #[command(
        after_help = "For a device that is failing but still readable by the server. A client's report of a\nfailed path alone moves nothing while the server reads the device (that client's I/O\ngoes through the server; `pool list` shows it); the server declares a device failed by\nitself when its own I/O to it fails. Mirrored extents are copied from their other copy,\nthe rest from the device through the server's own path; clients' writes go through the\nserver during the copy.\n\nExample:\n  sanctl recovery start /srv/san/disk0.img"
    )]
    Start {
        /// The device (its path or UUID, as `pool list` shows).
        device: String,
        /// Return once the recoveries started instead of showing their progress.
        #[arg(long)]
        no_wait: bool,
    },
}

pub async fn run(command: RecoveryCommand, context: &mut Context) -> Result<(), CliError> {
    match command {
        RecoveryCommand::Start { device, no_wait } => {
            let statuses: Vec<RecoveryStatus> = context
                .call(RecoveryStart {
                    device: device.clone(),
                })
                .await?;
            crate::relocation_cmd::follow_started(context, &device, &statuses, no_wait).await
        }
        RecoveryCommand::List => {
            let statuses: Vec<RecoveryStatus> = context.call(RecoveryList {}).await?;
            if context.json {
                return context.print_json(&statuses);
            }
            let rows: Vec<Vec<String>> = statuses
                .iter()
                .map(|s| {
                    vec![
                        s.volume_name.clone(),
                        s.kind.to_string(),
                        s.device_uuid.to_string(),
                        s.state.to_string(),
                        progress_line(s),
                    ]
                })
                .collect();
            print_table(&["VOLUME", "KIND", "DEVICE", "STATE", "PROGRESS"], &rows);
            Ok(())
        }
    }
}

/// Width of the bar in characters.
const BAR_WIDTH: usize = 30;

/// `[#########.....]  45.0%  7.2M/16M  ETA 3s`
pub fn progress_line(status: &RecoveryStatus) -> String {
    let fraction = (status.percent / 100.0).clamp(0.0, 1.0);
    let filled = ((fraction * BAR_WIDTH as f64).round() as usize).min(BAR_WIDTH);
    let eta = match status.eta_seconds {
        Some(seconds) => format!("ETA {}", format_duration(seconds)),
        None => "ETA ?".to_string(),
    };
    format!(
        "[{}{}] {:5.1}%  {}/{}  {eta}",
        "#".repeat(filled),
        ".".repeat(BAR_WIDTH - filled),
        status.percent,
        format_size(status.bytes_done),
        format_size(status.bytes_total),
    )
}

fn format_duration(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sanblk_proto::protocol::RecoveryState;

    #[test]
    fn progress_lines_show_a_bar_percent_and_eta() {
        let status = RecoveryStatus {
            volume_id: 1,
            volume_name: "db1".into(),
            device_uuid: uuid::Uuid::nil(),
            state: RecoveryState::Copying,
            percent: 50.0,
            bytes_done: 8 << 20,
            bytes_total: 16 << 20,
            eta_seconds: Some(75),
            message: String::new(),
            kind: Default::default(),
        };
        let line = progress_line(&status);
        assert!(line.starts_with(&format!("[{}{}]", "#".repeat(15), ".".repeat(15))));
        assert!(line.contains(" 50.0%"));
        assert!(line.contains("8M/16M"));
        assert!(line.ends_with("ETA 1m15s"));
    }
}

//! `sanctl`, the sanblk admin CLI and client agent.
//!
//! One module per subcommand group; each returns `Result<(), CliError>` and main turns that
//! into an exit code: 0 ok, 1 refused or failed (by the server, or on this host: a file, a
//! device, the kernel module), 2 usage, 3 cannot reach the server.
//!
//! Layers, lowest first; a module imports only from layers below it (the protocol, map and
//! clients come from `sanblk-proto`, the kernel's wire format from `sanblk-uapi`):
//! 1. `output` (tables), `context` (admin connection, errors, exit codes), `kernel_link`
//!    (generic netlink to the kmod), `map_encoding` (a map in the kernel's encoding, devices
//!    found by label).
//! 2. `pool`, `volume`, `client_cmd`, `recovery_cmd`: the admin subcommands (`volume` shows
//!    recovery progress with `recovery_cmd`'s bar).
//! 3. `agent`: `sanctl attach`, `detach`, `status`.

mod agent;
mod backup_cmd;
mod client_cmd;
mod context;
mod grow_cmd;
mod kernel_link;
mod map_encoding;
mod output;
mod pool;
mod recovery_cmd;
mod relocation_cmd;
mod snapshot_cmd;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use context::{CliError, Context};

pub const DEFAULT_ADMIN_SOCKET: &str = "/var/lib/sand/admin.sock";

#[derive(Debug, Parser)]
#[command(
    name = "sanctl",
    version,
    about = "Administer a sanblk server (sand) and attach its volumes on client hosts",
    after_help = "Examples:\n  sanctl pool add /dev/sdb\n  sanctl pool list\n  sanctl volume create db1 10G --layout mirror\n  sanctl client add host1 --secret-out /etc/sanblk/host1.secret\n  sanctl client grant host1 db1 rw\n  sanctl --json volume show db1\n\nOn a client host (sanblk.ko loaded):\n  sanctl attach db1 --server san1:7700 --client host1 --secret-file /etc/sanblk/host1.secret &\n  sanctl status\n  sanctl detach db1\n\nExit codes (the message on stderr): 0 ok; 1 refused or failed, by the server or on this\nhost (a file or device that cannot be read or written, the kernel module); 2 usage error;\n3 cannot reach the server."
)]
struct Cli {
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Admin socket of the server.
    #[arg(long, global = true, env = "SAND_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

/// One variant and one module per subcommand group. The agent side (`sanctl attach`,
/// `sanctl status`) plugs in the same way, using `sanblk_proto::client::AgentClient`; `Context` opens
/// the admin socket only when a command makes an admin call, so such commands never need it.
#[derive(Debug, Subcommand)]
enum Command {
    /// Storage pool: label SAN devices and show their space.
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// Volumes: create, grow, delete, list, show, move, mirror.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Clients: secrets and grants.
    #[command(subcommand)]
    Client(client_cmd::ClientCommand),
    /// Recoveries: volumes being moved off failed devices, with progress.
    #[command(subcommand)]
    Recovery(recovery_cmd::RecoveryCommand),
    /// Snapshots: create, list, delete, diff.
    #[command(subcommand)]
    Snapshot(snapshot_cmd::SnapshotCommand),
    /// Copy a snapshot into an image file (or onto a block device) over NBD: in full, or only
    /// what changed since an earlier snapshot (`--since`) into the image holding it. Run on
    /// the server host.
    #[command(
        after_help = "Examples:\n  sanctl backup db1 monday --to /backup/db1.img\n  sanctl backup db1 tuesday --to /backup/db1.img --since monday\n  sanctl backup db1 monday --to /dev/sdc\n\nShows a progress bar and the throughput. A backup that stops midway is run again as it\nwas; it never changes the snapshot. The image's snapshot is recorded in\nIMAGE.sanblk-backup.json once the copy is complete; `--since` builds only on that very\nsnapshot (one deleted and taken again under its name is another: make a full backup).\n\nOnto a block device (e.g. --to /dev/sdc), full backups only: the device must not be in\nuse and must hold the snapshot (it is not truncated; past the snapshot's size it is left\nas it was), and no record is kept (it would land in /dev), so `--since` onto a device is\nrefused. A restore from the device creates a volume of the whole device's size."
    )]
    Backup(backup_cmd::BackupArgs),
    /// Create a new volume holding an image (e.g. a backup), written over NBD. Run on the
    /// server host.
    #[command(
        after_help = "Example:\n  sanctl restore /backup/db1.img db1-restored\n\nThe volume is created with the image's size (rounded up to 4 KiB) and written whole; no\nclient may attach it until the restore is done."
    )]
    Restore(backup_cmd::RestoreArgs),
    /// Client agent: attach a volume on this host and keep it up to date (runs until detached).
    #[command(
        after_help = "Example:\n  sanctl attach db1 --server san1:7700 --client host1 --secret-file /etc/sanblk/host1.secret &\n\nPrints the block device (/dev/sanblkN) once attached; `sanctl detach db1` stops it."
    )]
    Attach(agent::AttachArgs),
    /// Detach a volume attached by `sanctl attach` on this host.
    Detach(agent::DetachArgs),
    /// Show the kernel module's view: attached volumes, epochs, SAN device paths and counters.
    Status(agent::StatusArgs),
    /// Grow a volume attached read-write on this host (through the server's change protocol;
    /// returns once the block device has the new size).
    #[command(
        after_help = "Example (then grow the filesystem, e.g. `resize2fs /dev/sanblk0`):\n  sanctl grow db1 20G"
    )]
    Grow(grow_cmd::GrowArgs),
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let mut context = Context::new(cli.admin_socket, cli.json);
    match cli.command {
        Command::Pool(command) => pool::run(command, &mut context).await,
        Command::Volume(command) => volume::run(command, &mut context).await,
        Command::Client(command) => client_cmd::run(command, &mut context).await,
        Command::Recovery(command) => recovery_cmd::run(command, &mut context).await,
        Command::Snapshot(command) => snapshot_cmd::run(command, &mut context).await,
        Command::Backup(args) => backup_cmd::backup(args, &mut context).await,
        Command::Restore(args) => backup_cmd::restore(args, &mut context).await,
        Command::Attach(args) => agent::attach(args).await,
        Command::Detach(args) => agent::detach(args).await,
        Command::Status(args) => agent::status(&context, &args),
        Command::Grow(args) => grow_cmd::grow(args, context.json).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sanctl: cannot start: {error}");
            return ExitCode::from(context::EXIT_UNREACHABLE);
        }
    };
    let json = cli.json;
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if json {
                // Scripts get the error in the same format as results, on stderr.
                let body = serde_json::json!({ "error": error.to_string(), "exit_code": error.exit_code() });
                eprintln!("{body}");
            } else {
                eprintln!("sanctl: {error}");
            }
            ExitCode::from(error.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// `--help` explains every argument, positional ones included: a bare `<NAME>` leaves
    /// the reader guessing which volume, client or snapshot it means.
    #[test]
    fn every_argument_of_every_command_has_help() {
        let mut unexplained = Vec::new();
        let mut pending = vec![(String::from("sanctl"), Cli::command())];
        while let Some((path, command)) = pending.pop() {
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    unexplained.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                pending.push((format!("{path} {}", sub.get_name()), sub.clone()));
            }
        }
        assert!(unexplained.is_empty(), "without help: {unexplained:?}");
    }
}

//! `sanctl client ...` (administration of clients; the agent itself is `sanctl attach`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use clap::Subcommand;
use sanblk_proto::map::AccessMode;
use sanblk_proto::protocol::{
    ClientAdd, ClientCreated, ClientGrant, ClientInfo, ClientList, ClientRemove, ClientRevoke,
};

use crate::context::{CliError, Context};
use crate::output::print_table;

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Register a client and print its secret (shown once; the server keeps it 0600).
    #[command(
        after_help = "Examples:\n  sanctl client add host1\n  sanctl client add host1 --secret-out /etc/sanblk/host1.secret"
    )]
    Add {
        /// Name of the client (the host's name, as its agent gives it with `--client`).
        name: String,
        /// Also write the secret to this file (created with mode 0600, must not exist).
        #[arg(long)]
        secret_out: Option<PathBuf>,
    },
    /// Allow a client to attach a volume read-only or read-write.
    #[command(after_help = "Example:\n  sanctl client grant host1 db1 rw")]
    Grant {
        /// The client.
        name: String,
        /// The volume it may attach.
        volume: String,
        /// ro (read-only) or rw (read-write; a volume has one read-write attachment at a time).
        #[arg(value_parser = parse_mode)]
        mode: AccessMode,
    },
    /// Withdraw a client's grant on a volume (its connections are closed).
    Revoke {
        /// The client.
        name: String,
        /// The volume it may no longer attach.
        volume: String,
    },
    /// Remove a client and its secret (its connections are closed).
    Remove {
        /// The client to remove.
        name: String,
    },
    /// List clients and their grants.
    List,
}

fn parse_mode(text: &str) -> Result<AccessMode, String> {
    text.parse()
}

/// Creates the secret file before asking the server, so a bad path cannot lose the secret.
fn create_secret_file(path: &PathBuf) -> Result<std::fs::File, CliError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| CliError::Local(format!("{}: {e}", path.display())))
}

pub async fn run(command: ClientCommand, context: &mut Context) -> Result<(), CliError> {
    match command {
        ClientCommand::Add { name, secret_out } => {
            let secret_file = secret_out.as_ref().map(create_secret_file).transpose()?;
            let created: ClientCreated = match context.call(ClientAdd { name }).await {
                Ok(created) => created,
                Err(error) => {
                    if let Some(path) = &secret_out {
                        let _ = std::fs::remove_file(path);
                    }
                    return Err(error);
                }
            };
            if let (Some(mut file), Some(path)) = (secret_file, &secret_out) {
                writeln!(file, "{}", created.secret)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| CliError::Local(format!("{}: {e}", path.display())))?;
            }
            if context.json {
                return context.print_json(&created);
            }
            println!(
                "client {} added; its secret (shown only now):",
                created.name
            );
            println!("{}", created.secret);
            Ok(())
        }
        ClientCommand::Grant { name, volume, mode } => {
            let client: Option<ClientInfo> = context
                .call(ClientGrant {
                    name: name.clone(),
                    volume: volume.clone(),
                    mode,
                })
                .await?;
            if context.json {
                return context.print_json(&client);
            }
            println!("client {name} may attach {volume} {mode}");
            Ok(())
        }
        ClientCommand::Revoke { name, volume } => {
            let client: Option<ClientInfo> = context
                .call(ClientRevoke {
                    name: name.clone(),
                    volume: volume.clone(),
                })
                .await?;
            if context.json {
                return context.print_json(&client);
            }
            // The server answers once the client's leases on the volume have expired (or it
            // was not attached): from then on it cannot write to the volume.
            println!(
                "client {name} may no longer attach {volume}; fenced (no lease of it on the \
                 volume is left)"
            );
            Ok(())
        }
        ClientCommand::Remove { name } => {
            let result = context.call(ClientRemove { name: name.clone() }).await?;
            if context.json {
                return context.print_json(&result);
            }
            println!("removed client {name}");
            Ok(())
        }
        ClientCommand::List => {
            let clients: Vec<ClientInfo> = context.call(ClientList {}).await?;
            if context.json {
                return context.print_json(&clients);
            }
            let rows: Vec<Vec<String>> = clients
                .iter()
                .map(|c| {
                    let grants: Vec<String> = c
                        .grants
                        .iter()
                        .map(|g| format!("{}:{}", g.name, g.mode))
                        .collect();
                    let attachments: Vec<String> = c
                        .attachments
                        .iter()
                        .map(|a| {
                            format!(
                                "{}:{} lease {:.1}s{}",
                                a.volume,
                                a.mode,
                                a.lease_left_ms as f64 / 1000.0,
                                if a.disconnected {
                                    " (disconnected)"
                                } else {
                                    ""
                                }
                            )
                        })
                        .collect();
                    vec![c.name.clone(), grants.join(","), attachments.join(", ")]
                })
                .collect();
            print_table(&["CLIENT", "GRANTS", "ATTACHED"], &rows);
            Ok(())
        }
    }
}

//! Shared plumbing of all subcommands: the admin connection, output mode, errors and exit codes.

use std::path::PathBuf;

use sanblk_proto::client::{AdminClient, ClientError};
use sanblk_proto::protocol::AdminCall;

/// Refused or failed: by the server, or on this host (`CliError::Local`).
pub const EXIT_REFUSED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_UNREACHABLE: u8 = 3;

#[derive(Debug)]
pub enum CliError {
    /// The server answered with an error.
    Refused(String),
    /// Bad arguments that clap could not catch (e.g. an invalid size).
    Usage(String),
    /// No server, or the connection broke.
    Unreachable(String),
    /// A local failure (e.g. writing the secret file); exits as a refusal does.
    Local(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Refused(_) | CliError::Local(_) => EXIT_REFUSED,
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Unreachable(_) => EXIT_UNREACHABLE,
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Refused(message) | CliError::Local(message) => f.write_str(message),
            CliError::Usage(message) => write!(f, "usage: {message}"),
            CliError::Unreachable(message) => write!(f, "cannot reach the server: {message}"),
        }
    }
}

impl From<ClientError> for CliError {
    fn from(error: ClientError) -> Self {
        match error {
            ClientError::Server(body) => CliError::Refused(body.message),
            other => CliError::Unreachable(other.to_string()),
        }
    }
}

pub struct Context {
    admin_socket: PathBuf,
    pub json: bool,
    connection: Option<AdminClient>,
}

impl Context {
    pub fn new(admin_socket: PathBuf, json: bool) -> Context {
        Context {
            admin_socket,
            json,
            connection: None,
        }
    }

    async fn admin(&mut self) -> Result<&mut AdminClient, CliError> {
        if self.connection.is_none() {
            self.connection = Some(AdminClient::connect(&self.admin_socket).await?);
        }
        self.connection
            .as_mut()
            .ok_or_else(|| CliError::Unreachable("no connection".into()))
    }

    /// Sends an admin request and returns its reply.
    pub async fn call<R: AdminCall>(&mut self, request: R) -> Result<R::Reply, CliError> {
        Ok(self.admin().await?.call(request).await?)
    }

    /// Prints `value` as JSON (for `--json`).
    pub fn print_json<T: serde::Serialize>(&self, value: &T) -> Result<(), CliError> {
        let text =
            serde_json::to_string_pretty(value).map_err(|e| CliError::Local(e.to_string()))?;
        println!("{text}");
        Ok(())
    }
}

pub fn parse_size_arg(text: &str) -> Result<u64, CliError> {
    sanblk_proto::map::parse_size(text).map_err(CliError::Usage)
}

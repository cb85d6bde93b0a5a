//! Guests whose "SAN device" `san0` is a dm device over their first virtio disk (`/dev/vda`),
//! so a test can fail the direct path from inside the guest (dm-error under the volume) and
//! heal it again. [`script`] and [`vm`] attach one volume of a [`Provisioned`] server through
//! the agent; the failure bench, with volumes of its own, uses only the [`prologue`].

use std::path::Path;
use std::time::Duration;

use crate::{module_path, target_bin, Provisioned, VmConfig};

/// Guest shell function `wait_long FILE`: waits up to 10 min for FILE (the prologue's
/// `wait_for` gives up after 60 s, too soon for a guest that is booting or a slow copy).
pub const WAIT_LONG: &str = r#"wait_long() { for i in $(seq 1 3000); do [ -e "$1" ] && return 0; sleep 0.2; done; echo "timeout waiting for $1"; return 1; }"#;

/// A guest on every image of `provisioned` (`san0.img` is `/dev/vda`, the spare `/dev/vdb`),
/// with the server's agent and I/O ports forwarded, running [`script`].
pub fn vm(
    provisioned: &Provisioned,
    name: &str,
    volume: &str,
    attach_args: &str,
    body: &str,
    timeout: Duration,
) -> VmConfig {
    let server = &provisioned.server;
    let script = script(provisioned, volume, attach_args, body);
    let mut config = VmConfig::new(name, &script)
        .forward_port(server.port)
        .forward_port(server.io_port().expect("io port"))
        .timeout(timeout);
    for image in &provisioned.images {
        config = config.disk(image);
    }
    config
}

/// Guest shell lines loading `module` and creating `san0` dm-linear over `/dev/vda`. Then
/// `$S` is sanctl, `$SECTORS` the size of san0, `$LINEAR` and `$ERROR` its healthy and failed
/// tables; `wait_for FILE` waits up to 60 s, `fail_san0` puts the error table under it.
pub fn prologue(module: &Path) -> String {
    format!(
        r#"insmod {module}
S={sanctl}
wait_for() {{ for i in $(seq 1 300); do [ -e "$1" ] && return 0; sleep 0.2; done; echo "timeout waiting for $1"; return 1; }}
SECTORS=$(blockdev --getsz /dev/vda)
LINEAR="0 $SECTORS linear /dev/vda 0"
ERROR="0 $SECTORS error"
dmsetup create san0 --table "$LINEAR"
fail_san0() {{ dmsetup reload san0 --table "$ERROR"; dmsetup resume san0; }}
"#,
        module = module.display(),
        sanctl = target_bin("sanctl").display(),
    )
}

/// Guest script: the module loaded, `san0` dm-linear over `/dev/vda`, the agent attaching
/// `volume` in the background (`$AGENT` its pid, its log `agent.log`), `$dev` the volume's
/// device, then `body`; at the end the module is unloaded and `san0` removed, so `body` has
/// to detach. `attach_args` go to `sanctl attach` before the server's I/O address (more
/// `--device`s, another `--io-server` to try first).
///
/// For `body`, beside what [`prologue`] defines: `$D` is the scratch dir (the secret of
/// `host1` is there), `$SERVER` and `$IO_SERVER` are the server's addresses.
pub fn script(provisioned: &Provisioned, volume: &str, attach_args: &str, body: &str) -> String {
    let server = &provisioned.server;
    format!(
        r#"set -ex
{prologue}D={dir}
SERVER=10.0.2.100:{port}
IO_SERVER=10.0.2.100:{io_port}
$S attach {volume} --server $SERVER --client host1 --secret-file $D/host1.secret \
    --device /dev/mapper/san0 {attach_args} --io-server $IO_SERVER > agent.log 2>&1 &
AGENT=$!
wait_for /run/sanblk/{volume}.device
dev=$(cat /run/sanblk/{volume}.device)
{body}
rmmod sanblk
dmsetup remove san0
"#,
        prologue = prologue(&module_path()),
        dir = provisioned.dir.display(),
        port = server.port,
        io_port = server.io_port().expect("io port"),
    )
}

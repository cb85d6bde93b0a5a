//! End-to-end: a real `sand` on the host's loopback, a QEMU guest running the real module and
//! the `sanctl attach` agent. Volumes are created on the server, attached in the guest by label
//! lookup, written through /dev/sanblkN, grown while attached (the new epoch reaches the
//! kernel), detached; the host then finds every block where the server's map says.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sanblk_tests::blocks::BLOCK;
use sanblk_tests::{
    blocks, module_path, paths_by_uuid, scratch_dir, sparse_image, spawn, target_bin, SandServer,
    VmConfig,
};

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 16 * MIB;

fn pattern(seed: u8, size: u64) -> Vec<u8> {
    blocks::pattern("sand", seed, size)
}

fn wait_for_file(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn agent_attaches_server_volumes_follows_epochs_and_data_lands_per_map() {
    let dir = scratch_dir("attach").expect("scratch");
    let server = SandServer::start(&dir).expect("sand");
    // san2 is small and never given to the guest: the volume on it must fail to attach with
    // a message naming its device; it is filled first so no other volume lands on it.
    let sizes = [128 * MIB, 128 * MIB, 16 * MIB];
    let images: Vec<PathBuf> = sizes
        .iter()
        .enumerate()
        .map(|(i, size)| {
            let path = dir.join(format!("san{i}.img"));
            sparse_image(&path, *size).expect("image");
            path
        })
        .collect();
    server.pool_add(&images[2]);
    server.sanctl(&["volume", "create", "vmiss", "12M"]);
    for image in &images[..2] {
        server.pool_add(image);
    }
    server.sanctl(&["volume", "create", "vlin", "16M"]);
    server.sanctl(&["volume", "create", "vmir", "16M", "--layout", "mirror"]);
    server.sanctl(&["volume", "create", "vstr", "16M", "--layout", "striped:2"]);
    server.add_client("host1", &["vlin", "vmir", "vstr", "vmiss"]);
    let pool = server.pool();
    let by_uuid = paths_by_uuid(&pool);

    let seeds = [("vlin", 1u8), ("vmir", 2), ("vstr", 3)];
    for (volume, seed) in seeds {
        fs::write(dir.join(format!("{volume}.pattern")), pattern(seed, VOLUME)).expect("pattern");
    }
    let script = format!(
        r#"set -ex
insmod {module}
S={sanctl}
D={dir}
wait_for() {{ for i in $(seq 1 300); do [ -e "$1" ] && return 0; sleep 0.2; done; echo "timeout waiting for $1"; return 1; }}
# Wrong secret and unknown volume are refused with a message and exit code 1.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > /tmp/wrong.secret
if $S attach vlin --server 10.0.2.100:{port} --client host1 --secret-file /tmp/wrong.secret 2> wrong-secret.txt; then exit 10; fi
if $S attach vmiss --server 10.0.2.100:{port} --client host1 --secret-file $D/host1.secret 2> missing-device.txt; then exit 12; fi
if $S attach nosuch --server 10.0.2.100:{port} --client host1 --secret-file $D/host1.secret 2> unknown-volume.txt; then exit 11; fi
for v in vlin vmir vstr; do
    $S attach $v --server 10.0.2.100:{port} --client host1 --secret-file $D/host1.secret > agent-$v.log 2>&1 &
done
for v in vlin vmir vstr; do wait_for /run/sanblk/$v.device; done
for v in vlin vmir vstr; do
    dd if=$D/$v.pattern of=$(cat /run/sanblk/$v.device) bs=1M oflag=direct conv=fsync status=none
done
for v in vlin vmir vstr; do
    dd if=$(cat /run/sanblk/$v.device) of=/tmp/back bs=1M count=16 iflag=direct status=none
    cmp /tmp/back $D/$v.pattern
done
$S status > status-before-grow.txt
touch attached
# The host grows vlin now; the new epoch must reach the kernel.
dev=$(cat /run/sanblk/vlin.device)
for i in $(seq 1 300); do [ "$(blockdev --getsize64 $dev)" = 33554432 ] && break; sleep 0.2; done
blockdev --getsize64 $dev > grown-size.txt
dd if=/dev/urandom of=/tmp/tail bs=1M count=1 status=none
dd if=/tmp/tail of=$dev bs=1M seek=31 oflag=direct status=none
dd if=$dev of=/tmp/tail.back bs=1M skip=31 count=1 iflag=direct status=none
cmp /tmp/tail /tmp/tail.back
$S status > status.txt
$S --json status > status.json
for v in vlin vmir vstr; do $S detach $v; done
test ! -e /dev/sanblk0
rmmod sanblk
"#,
        module = module_path().display(),
        sanctl = target_bin("sanctl").display(),
        dir = dir.display(),
        port = server.port,
    );
    // The guest gets images 0 and 1 only.
    let config = VmConfig::new("attach-server", &script)
        .disk(&images[0])
        .disk(&images[1])
        .forward_port(server.port)
        .timeout(Duration::from_secs(400));
    let vm = spawn(&config).expect("guest started");
    let attached = vm.log_dir().join("attached");
    if wait_for_file(&attached, Duration::from_secs(300)) {
        server.sanctl(&["volume", "grow", "vlin", "32M"]);
    }
    let outcome = vm.wait().expect("guest ran");
    outcome.assert_clean_success();

    assert!(outcome
        .read_out_file("wrong-secret.txt")
        .expect("wrong")
        .contains("authentication failed"));
    let missing_uuid = pool
        .iter()
        .find(|d| d.path == images[2].display().to_string())
        .expect("san2")
        .uuid;
    let missing = outcome
        .read_out_file("missing-device.txt")
        .expect("missing");
    assert!(
        missing.contains(&missing_uuid.to_string()),
        "missing device not named: {missing}"
    );
    assert!(outcome
        .read_out_file("unknown-volume.txt")
        .expect("unknown")
        .contains("nosuch"));
    assert_eq!(
        outcome
            .read_out_file("grown-size.txt")
            .expect("size")
            .trim(),
        (32 * MIB).to_string()
    );
    let status = outcome.read_out_file("status.txt").expect("status");
    assert!(
        status.contains("vlin") && status.contains("vmir") && status.contains("vstr"),
        "{status}"
    );
    let kernel: serde_json::Value =
        serde_json::from_str(&outcome.read_out_file("status.json").expect("json"))
            .expect("status json");
    let vlin = kernel["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "vlin"))
        .expect("vlin in status");
    assert_eq!(vlin["size_bytes"], 32 * MIB);
    assert!(
        vlin["epoch"].as_u64().unwrap_or(0) >= 2,
        "epoch did not advance: {vlin}"
    );

    let mut checked = 0;
    for (volume, seed) in seeds {
        let map = server.volume(volume).map;
        checked += blocks::verify_against_map(&map, &by_uuid, &pattern(seed, VOLUME));
    }
    // 16 MiB per volume, mirror twice: every block was checked.
    assert_eq!(checked as u64, 4 * VOLUME / BLOCK);
}

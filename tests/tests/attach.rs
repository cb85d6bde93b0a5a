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

/// A guest script: `body` after loading the module, with `$S` (sanctl), `$D` (the scratch
/// dir), `$SERVER` (the server's agent port as the guest reaches it) and `wait_for FILE`.
fn guest_script(server: &SandServer, dir: &Path, body: &str) -> String {
    format!(
        r#"set -ex
insmod {module}
S={sanctl}
D={dir}
SERVER=10.0.2.100:{port}
wait_for() {{ for i in $(seq 1 300); do [ -e "$1" ] && return 0; sleep 0.2; done; echo "timeout waiting for $1"; return 1; }}
{body}"#,
        module = module_path().display(),
        sanctl = target_bin("sanctl").display(),
        dir = dir.display(),
        port = server.port,
    )
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
    let script = guest_script(
        &server,
        &dir,
        r#"# Wrong secret and unknown volume are refused with a message and exit code 1.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > /tmp/wrong.secret
if $S attach vlin --server $SERVER --client host1 --secret-file /tmp/wrong.secret 2> wrong-secret.txt; then exit 10; fi
if $S attach vmiss --server $SERVER --client host1 --secret-file $D/host1.secret 2> missing-device.txt; then exit 12; fi
if $S attach nosuch --server $SERVER --client host1 --secret-file $D/host1.secret 2> unknown-volume.txt; then exit 11; fi
for v in vlin vmir vstr; do
    $S attach $v --server $SERVER --client host1 --secret-file $D/host1.secret > agent-$v.log 2>&1 &
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
    );
    // The guest gets images 0 and 1 only.
    let config = VmConfig::new("attach-server", &script)
        .disk(&images[0])
        .disk(&images[1])
        .forward_port(server.port);
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

const GIB: u64 = 1 << 30;

/// A 64 GiB volume striped over two sparse 33 GiB images (a map of one-extent-per-stripe-unit
/// would need 65536 extents; the kernel takes 32 KiB of map). The guest writes near its end,
/// across the middle, then at the end of a grow made while attached; the host reads the
/// image files at the places the server's map gives.
#[test]
fn a_64_gib_striped_volume_lands_where_its_map_says() {
    let dir = scratch_dir("striped64").expect("scratch");
    let server = SandServer::start(&dir).expect("sand");
    let images: Vec<PathBuf> = (0..2)
        .map(|i| {
            let path = dir.join(format!("big{i}.img"));
            sparse_image(&path, 33 * GIB).expect("image");
            server.pool_add(&path);
            path
        })
        .collect();
    server.sanctl(&["volume", "create", "vbig", "64G", "--layout", "striped:2"]);
    server.add_client("host1", &["vbig"]);
    let by_uuid = paths_by_uuid(&server.pool());
    let map = server.volume("vbig").map;
    assert_eq!(map.extents.len(), 1, "{:?}", map.extents);
    assert!(matches!(
        map.extents[0].kind,
        sanblk_proto::map::ExtentKind::Striped { stripe_unit } if stripe_unit == MIB
    ));

    // (volume offset, length, seed): the last 8 MiB, 4 MiB across the middle (and across
    // a stripe unit boundary at an odd block), the last 4 MiB after growing by 64 MiB.
    let writes = [
        (64 * GIB - 8 * MIB, 8 * MIB, 21u8),
        (32 * GIB - 2 * MIB + 3 * BLOCK, 4 * MIB, 22),
        (64 * GIB + 60 * MIB, 4 * MIB, 23),
    ];
    for (_, length, seed) in writes {
        fs::write(dir.join(format!("w{seed}.pattern")), pattern(seed, length)).expect("pattern");
    }
    let dd = |(offset, length, seed): (u64, u64, u8)| {
        format!(
            "dd if=$D/w{seed}.pattern of=$dev bs=4096 seek={} oflag=direct conv=fsync status=none\n\
             dd if=$dev of=/tmp/back bs=4096 skip={} count={} iflag=direct status=none\n\
             cmp /tmp/back $D/w{seed}.pattern\n",
            offset / BLOCK,
            offset / BLOCK,
            length / BLOCK
        )
    };
    let script = guest_script(
        &server,
        &dir,
        &format!(
            r#"$S attach vbig --server $SERVER --client host1 --secret-file $D/host1.secret > agent.log 2>&1 &
wait_for /run/sanblk/vbig.device
dev=$(cat /run/sanblk/vbig.device)
blockdev --getsize64 $dev > size.txt
{first}{second}touch attached
for i in $(seq 1 300); do [ "$(blockdev --getsize64 $dev)" = {grown} ] && break; sleep 0.2; done
blockdev --getsize64 $dev > grown-size.txt
{third}$S detach vbig
rmmod sanblk
"#,
            first = dd(writes[0]),
            second = dd(writes[1]),
            third = dd(writes[2]),
            grown = 64 * GIB + 64 * MIB,
        ),
    );
    let config = VmConfig::new("attach-striped64", &script)
        .disk(&images[0])
        .disk(&images[1])
        .forward_port(server.port);
    let vm = spawn(&config).expect("guest started");
    if wait_for_file(&vm.log_dir().join("attached"), Duration::from_secs(300)) {
        server.sanctl(&["volume", "grow", "vbig", &format!("{}M", 64 * 1024 + 64)]);
    }
    let outcome = vm.wait().expect("guest ran");
    outcome.assert_clean_success();
    assert_eq!(
        outcome.read_out_file("size.txt").expect("size").trim(),
        (64 * GIB).to_string()
    );
    assert_eq!(
        outcome
            .read_out_file("grown-size.txt")
            .expect("size")
            .trim(),
        (64 * GIB + 64 * MIB).to_string()
    );

    let map = server.volume("vbig").map;
    // The grow continued both members: still one striped extent.
    assert_eq!(map.extents.len(), 1, "{:?}", map.extents);
    let mut checked = 0;
    for (offset, length, seed) in writes {
        checked += blocks::verify_range(&map, &by_uuid, offset, &pattern(seed, length));
    }
    assert_eq!(checked as u64, 16 * MIB / BLOCK);
    // The far end of the volume lives at the far end of the second member.
    let member = map.extents[0].replicas[1];
    let last = blocks::read_at(
        &by_uuid[&member.device_uuid],
        member.device_offset + map.extents[0].member_span() - BLOCK,
        BLOCK,
    )
    .expect("read");
    assert!(last == pattern(23, 4 * MIB)[(4 * MIB - BLOCK) as usize..]);
}

/// The agent stops on SIGTERM and on `sanctl detach` while the server is down (it used to
/// sit in its reconnect loop, deaf to both), and cleans up as a normal detach does: the
/// kernel device is destroyed and the run files are removed.
#[test]
fn the_agent_stops_and_cleans_up_while_the_server_is_down() {
    let dir = scratch_dir("agent-stop").expect("scratch");
    let mut server = SandServer::start(&dir).expect("sand");
    let image = dir.join("san0.img");
    sparse_image(&image, 64 * MIB).expect("image");
    server.pool_add(&image);
    server.sanctl(&["volume", "create", "vterm", "8M"]);
    server.sanctl(&["volume", "create", "vdet", "8M"]);
    server.add_client("host1", &["vterm", "vdet"]);
    let script = guest_script(
        &server,
        &dir,
        r#"$S attach vterm --server $SERVER --client host1 --secret-file $D/host1.secret > agent-vterm.log 2>&1 &
term_agent=$!
wait_for /run/sanblk/vterm.device
$S attach vdet --server $SERVER --client host1 --secret-file $D/host1.secret > agent-vdet.log 2>&1 &
det_agent=$!
wait_for /run/sanblk/vdet.device
term_dev=$(cat /run/sanblk/vterm.device)
det_dev=$(cat /run/sanblk/vdet.device)
dd if=/dev/urandom of=$term_dev bs=64k count=1 oflag=direct status=none
touch attached
# The host kills sand now.
for i in $(seq 1 300); do grep -q "lost the server" agent-vterm.log && grep -q "lost the server" agent-vdet.log && break; sleep 0.2; done
grep -q "lost the server" agent-vterm.log
grep -q "lost the server" agent-vdet.log
# Into the backoff: the first reconnection attempt fails after 1 s.
for i in $(seq 1 100); do grep -q "reconnect failed" agent-vterm.log && break; sleep 0.2; done
grep -q "reconnect failed" agent-vterm.log
start=$(date +%s)
kill -TERM $term_agent
for i in $(seq 1 100); do kill -0 $term_agent 2>/dev/null || break; sleep 0.1; done
if kill -0 $term_agent 2>/dev/null; then echo "agent ignored SIGTERM"; exit 20; fi
echo $(( $(date +%s) - start )) > sigterm-seconds.txt
wait $term_agent
test ! -e /run/sanblk/vterm.pid
test ! -e /run/sanblk/vterm.device
test ! -e $term_dev
start=$(date +%s)
$S detach vdet > detach.txt 2>&1 || { cat detach.txt; exit 21; }
echo $(( $(date +%s) - start )) > detach-seconds.txt
wait $det_agent
test ! -e /run/sanblk/vdet.pid
test ! -e $det_dev
$S status > status.txt
rmmod sanblk
"#,
    );
    let config = VmConfig::new("attach-agent-stop", &script)
        .disk(&image)
        .forward_port(server.port);
    let vm = spawn(&config).expect("guest started");
    if wait_for_file(&vm.log_dir().join("attached"), Duration::from_secs(200)) {
        server.kill9();
    }
    let outcome = vm.wait().expect("guest ran");
    outcome.assert_clean_success();
    for (file, limit) in [("sigterm-seconds.txt", 5), ("detach-seconds.txt", 10)] {
        let seconds: u64 = outcome
            .read_out_file(file)
            .expect("timing")
            .trim()
            .parse()
            .expect("seconds");
        assert!(seconds <= limit, "{file}: {seconds} s");
    }
    assert!(outcome
        .read_out_file("detach.txt")
        .expect("detach")
        .contains("detached vdet"));
    for volume in ["vterm", "vdet"] {
        let log = outcome
            .read_out_file(&format!("agent-{volume}.log"))
            .expect("agent log");
        assert!(log.contains("the server is unreachable"), "{volume}: {log}");
    }
    assert!(outcome
        .read_out_file("status.txt")
        .expect("status")
        .contains("no volumes attached"));
}

/// A write to a read-only attachment fails as a write to any read-only disk of the same kernel
/// does (a `losetup -r` loop device, refused by the block layer before its driver: EPERM),
/// reads work, and the image is unchanged.
#[test]
fn a_write_to_a_read_only_attachment_fails_as_on_any_read_only_disk() {
    let setup = sanblk_tests::provision("attach-ro", &[], &["vro"], false);
    let body = r#"dd if=/dev/zero of=$dev bs=4096 count=1 oflag=direct 2> sanblk-write.err \
    && echo accepted >> sanblk-write.err || true
truncate -s 16M /tmp/ro.img
LOOP=$(losetup -r -f --show /tmp/ro.img)
dd if=/dev/zero of=$LOOP bs=4096 count=1 oflag=direct 2> loop-write.err \
    && echo accepted >> loop-write.err || true
losetup -d $LOOP
dd if=$dev of=/dev/null bs=4096 count=4 iflag=direct status=none
$S detach vro
"#;
    let before = fs::read(&setup.images[0]).expect("image");
    let config = sanblk_tests::dm_san::vm(
        &setup,
        "attach-ro",
        "vro",
        "--ro",
        body,
        Duration::from_secs(300),
    );
    let outcome = sanblk_tests::run(&config).expect("guest ran");
    outcome.assert_clean_success();
    let sanblk = outcome
        .read_out_file("sanblk-write.err")
        .expect("sanblk-write.err");
    let loop_device = outcome
        .read_out_file("loop-write.err")
        .expect("loop-write.err");
    assert!(
        sanblk.contains("Operation not permitted") && !sanblk.contains("accepted"),
        "write to the read-only attachment: {sanblk}"
    );
    assert!(
        loop_device.contains("Operation not permitted"),
        "the read-only loop device answered otherwise: {loop_device}"
    );
    assert!(
        fs::read(&setup.images[0]).expect("image") == before,
        "the read-only attachment changed the image"
    );
}

/// Allocation on a client's request: `sanctl grow` run in the guest grows the volume holding
/// a mounted ext4 (the server's change protocol quiesces the guest's kernel, commits, pushes
/// the new map, which gives the block device its new size), `resize2fs` grows the filesystem
/// online, and a file that needs the new space is written. The host checks the server's map,
/// and finds both files' data in the image file where that map says.
#[test]
fn a_mounted_ext4_grows_online_through_sanctl_grow_on_the_client() {
    let provisioned = sanblk_tests::provision("attach-grow", &[], &["vgrow"], false);
    let before = pattern(41, 8 * MIB);
    let after = pattern(42, 20 * MIB);
    fs::write(provisioned.dir.join("before.pattern"), &before).expect("pattern");
    fs::write(provisioned.dir.join("after.pattern"), &after).expect("pattern");
    let body = r#"mkfs.ext4 -q -F -b 4096 $dev
mkdir -p /tmp/mnt
mount $dev /tmp/mnt
cp $D/before.pattern /tmp/mnt/before
sync
# 8 MiB used of 16: the 20 MiB file does not fit yet.
if cp $D/after.pattern /tmp/mnt/after 2> nospace.txt; then echo "fit before the grow"; exit 1; fi
rm -f /tmp/mnt/after
$S grow vgrow 48M > grow.txt
blockdev --getsize64 $dev > grown-size.txt
resize2fs $dev > resize.txt 2>&1
cp $D/after.pattern /tmp/mnt/after
sync
df -k /tmp/mnt > df.txt
umount /tmp/mnt
e2fsck -fn $dev > fsck.txt 2>&1
mount -o ro $dev /tmp/mnt
cmp /tmp/mnt/before $D/before.pattern
cmp /tmp/mnt/after $D/after.pattern
umount /tmp/mnt
dd if=$dev of=final.img bs=1M iflag=direct status=none
$S detach vgrow"#;
    let config = sanblk_tests::dm_san::vm(
        &provisioned,
        "attach-grow",
        "vgrow",
        "",
        body,
        Duration::from_secs(400),
    );
    let outcome = sanblk_tests::run(&config).expect("guest ran");
    outcome.assert_clean_success();
    let grown = outcome.read_out_file("grow.txt").expect("grow.txt");
    assert!(grown.contains("is now 48M"), "{grown}");
    let size = outcome.read_out_file("grown-size.txt").expect("size");
    assert_eq!(size.trim(), (48 * MIB).to_string());
    let map = provisioned.server.volume("vgrow").map;
    assert_eq!(map.size_bytes, 48 * MIB);
    // What the guest read back at the end is in the image file where the map says, and
    // holds both files (every block of each, in whatever order ext4 placed them).
    let final_image = fs::read(outcome.log_dir.join("final.img")).expect("final.img");
    assert_eq!(final_image.len() as u64, 48 * MIB);
    blocks::verify_against_map(&map, &provisioned.by_uuid, &final_image);
    let on_volume: std::collections::HashSet<&[u8]> =
        final_image.chunks_exact(BLOCK as usize).collect();
    for (name, data) in [("before", &before), ("after", &after)] {
        let missing = data
            .chunks_exact(BLOCK as usize)
            .filter(|block| !on_volume.contains(block))
            .count();
        assert_eq!(missing, 0, "{name}: {missing} blocks not on the volume");
    }
}

//! End-to-end tests of the direct data path in the kernel module, driven over netlink by the
//! guest probe (no server): linear, striped and mirrored volumes on real virtio disks backed
//! by image files. After the guest exits, the host reads the image files and checks that every
//! block landed exactly where the layout puts it.

use std::fs;
use std::path::{Path, PathBuf};

use sanblk_tests::blocks::BLOCK;
use sanblk_tests::{blocks, module_path, run, scratch_dir, sparse_image, target_bin, VmConfig};

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 16 * MIB;
const IMAGE: u64 = 64 * MIB;

fn pattern(seed: u8, size: u64) -> Vec<u8> {
    blocks::pattern("sanblk", seed, size)
}

fn read_at(image: &Path, offset: u64, len: u64) -> Vec<u8> {
    blocks::read_at(image, offset, len).expect("read image")
}

/// Where byte `offset` of each layout lives: (image index, image offset) per copy. This is the
/// host's independent statement of the recipe the guest probe encodes into the map.
fn locations(layout: &str, offset: u64) -> Vec<(usize, u64)> {
    match layout {
        "linear" if offset < VOLUME / 2 => vec![(0, MIB + offset)],
        "linear" => vec![(1, 3 * MIB + offset - VOLUME / 2)],
        "mirror" => vec![(0, MIB + offset), (1, 2 * MIB + offset)],
        "striped" => {
            let unit = 65536;
            let chunk = offset / unit;
            vec![(
                (chunk % 2) as usize,
                MIB + (chunk / 2) * unit + offset % unit,
            )]
        }
        other => panic!("unknown layout {other}"),
    }
}

fn verify_layout(layout: &str, images: &[PathBuf], expected: &[u8]) {
    for block in 0..VOLUME / BLOCK {
        let want = &expected[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize];
        for (image, offset) in locations(layout, block * BLOCK) {
            let got = read_at(&images[image], offset, BLOCK);
            assert!(
                got == want,
                "{layout}: volume block {block} not at image {image} offset {offset}: found {:?}",
                String::from_utf8_lossy(&got[..40])
            );
        }
    }
    // Nothing outside the layout's space was written: the first MiB of every image is zero.
    for image in images {
        assert!(
            read_at(image, 0, MIB).iter().all(|b| *b == 0),
            "{layout}: write below 1 MiB in {image:?}"
        );
    }
}

fn images(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    (0..2)
        .map(|i| {
            let path = dir.join(format!("{prefix}-{i}.img"));
            sparse_image(&path, IMAGE).expect("image");
            path
        })
        .collect()
}

/// `/sys/block/sanblkN/stat` of the three volumes, one line each, before and after every
/// volume was written and read whole: each disk counted at least that many sectors each way
/// (linear bios go in place, mirrored writes are cloned, striped bios are split and chained:
/// every path accounts), and no I/O is left counted in flight.
fn verify_block_statistics(before: &str, after: &str) {
    let fields = |text: &str| -> Vec<Vec<u64>> {
        text.lines()
            .map(|line| {
                line.split_whitespace()
                    .map(|f| f.parse().expect("numeric stat field"))
                    .collect()
            })
            .collect()
    };
    let (before, after) = (fields(before), fields(after));
    assert_eq!((before.len(), after.len()), (3, 3), "{before:?} {after:?}");
    // Documentation/block/stat.rst: read I/Os, read sectors, write I/Os, write sectors, in flight.
    const READ_IOS: usize = 0;
    const READ_SECTORS: usize = 2;
    const WRITE_IOS: usize = 4;
    const WRITE_SECTORS: usize = 6;
    const IN_FLIGHT: usize = 8;
    let sectors = VOLUME / 512;
    for (disk, (b, a)) in before.iter().zip(&after).enumerate() {
        let delta = |field: usize| a[field] - b[field];
        assert!(
            delta(READ_IOS) > 0 && delta(WRITE_IOS) > 0,
            "sanblk{disk}: {b:?} -> {a:?}"
        );
        assert!(
            delta(READ_SECTORS) >= sectors,
            "sanblk{disk} reads: {b:?} -> {a:?}"
        );
        assert!(
            delta(WRITE_SECTORS) >= sectors,
            "sanblk{disk} writes: {b:?} -> {a:?}"
        );
        assert_eq!(a[IN_FLIGHT], 0, "sanblk{disk} I/O left in flight: {a:?}");
    }
}

#[test]
fn volumes_place_every_block_where_the_map_says() {
    let dir = scratch_dir("datapath").expect("scratch dir");
    let linear = images(&dir, "linear");
    let mirror = images(&dir, "mirror");
    let striped = images(&dir, "striped");
    let patterns: Vec<(&str, u8)> = vec![("linear", 11), ("mirror", 22), ("striped", 33)];
    for (layout, seed) in &patterns {
        fs::write(
            dir.join(format!("{layout}.pattern")),
            pattern(*seed, VOLUME),
        )
        .expect("pattern");
    }
    let probe = target_bin("sanblk-nlprobe").display().to_string();
    let dir_text = dir.display().to_string();
    let script = format!(
        r#"set -ex
insmod {module}
P={probe}
D={dir_text}
$P create lin 1 1 linear 16 /dev/vda /dev/vdb
$P create mir 2 1 mirror 16 /dev/vdc /dev/vdd
$P create str 3 1 striped 16 /dev/vde /dev/vdf
ls -l /dev/sanblk* > devices.txt
for n in 0 1 2; do
    echo "$(cat /sys/block/sanblk$n/sanblk/volume_name) $(cat /sys/block/sanblk$n/sanblk/volume_id) $(cat /sys/block/sanblk$n/sanblk/epoch)" >> sysfs.txt
done
# A volume in use cannot be detached; I/O in flight is unaffected.
fio --name=busy --filename=/dev/sanblk1 --rw=randwrite --bs=4k --size=16M --direct=1 \
    --ioengine=libaio --iodepth=8 --runtime=4 --time_based --output=busy-fio.txt &
exec 3</dev/sanblk1
if $P destroy 2 2> busy-destroy.txt; then echo "detached a volume in use"; exit 8; fi
exec 3<&-
wait
# io_uring issues REQ_NOWAIT I/O inline on a sanblk disk: no io-wq worker (iou-wrk) has to
# take the linear volume's I/O. Mirrored writes are refused with BLK_STS_AGAIN and re-issued
# by io_uring from its workers: fio sees no error either way.
fio --name=uring --filename=/dev/sanblk0 --rw=randrw --bs=4k --size=16M --direct=1 \
    --ioengine=io_uring --iodepth=16 --runtime=4 --time_based --output=uring-fio.txt &
URING=$!
workers=0
while kill -0 $URING 2>/dev/null; do
    n=$(cat /proc/[0-9]*/task/*/comm 2>/dev/null | grep -c '^iou-wrk' || true)
    [ "$n" -gt "$workers" ] && workers=$n
    sleep 0.3
done
echo $workers > uring-workers.txt
wait $URING
fio --name=uring-mirror --filename=/dev/sanblk1 --rw=randwrite --bs=4k --size=16M --direct=1 \
    --ioengine=io_uring --iodepth=16 --verify=crc32c --do_verify=1 --output=uring-mirror.txt
# Devices are held exclusively while attached.
if dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct,excl 2>/dev/null; then echo "vda not exclusive"; exit 9; fi
# fio verifies random writes through the linear volume before the pattern goes on it, while
# new epochs of the same layout replace the map under it: each bio sees one whole epoch.
fio --name=verify --filename=/dev/sanblk0 --rw=randwrite --bs=4k --size=16M --direct=1 \
    --ioengine=libaio --iodepth=16 --verify=crc32c --do_verify=1 --output=fio.txt &
for epoch in $(seq 2 21); do $P update lin 1 $epoch linear 16 /dev/vda /dev/vdb; done
wait $!
cat /sys/block/sanblk0/sanblk/epoch > epoch-after-updates.txt
# ext4 on the striped volume: create, fill, unmount, mount again, verify.
mkfs.ext4 -q -F /dev/sanblk2
mkdir -p /tmp/mnt
mount /dev/sanblk2 /tmp/mnt
for i in 1 2 3 4; do dd if=/dev/urandom of=/tmp/mnt/file$i bs=64k count=16 status=none; done
(cd /tmp/mnt && md5sum file* > /tmp/sums)
umount /tmp/mnt
mount /dev/sanblk2 /tmp/mnt
(cd /tmp/mnt && md5sum -c /tmp/sums) > ext4-verify.txt
umount /tmp/mnt
# Discard and flush pass through.
blkdiscard -o 0 -l 1048576 /dev/sanblk0
blockdev --flushbufs /dev/sanblk0
# Known patterns for the host to find in the image files; the disks' block-layer statistics
# (what iostat reads) must count them.
for n in 0 1 2; do echo $(cat /sys/block/sanblk$n/stat) >> stat-before.txt; done
dd if=$D/linear.pattern of=/dev/sanblk0 bs=1M oflag=direct conv=fsync status=none
dd if=$D/mirror.pattern of=/dev/sanblk1 bs=256k oflag=direct conv=fsync status=none
dd if=$D/striped.pattern of=/dev/sanblk2 bs=1M oflag=direct conv=fsync status=none
for n in 0 1 2; do dd if=/dev/sanblk$n of=/tmp/readback bs=1M iflag=direct status=none; done
cmp /tmp/readback $D/striped.pattern
dd if=/dev/sanblk1 bs=4k skip=100 count=1 iflag=direct status=none | cmp - $D/mirror.pattern -n 4096 -i 0:409600
for n in 0 1 2; do echo $(cat /sys/block/sanblk$n/stat) >> stat-after.txt; done
$P status > status.txt
$P destroy 1
$P destroy 2
test ! -e /dev/sanblk0
# Unloading with a volume still attached (not open) tears it down.
rmmod sanblk
test ! -e /dev/sanblk2
"#,
        module = module_path().display(),
    );
    let mut config = VmConfig::new("datapath-layouts", &script);
    for image in linear.iter().chain(&mirror).chain(&striped) {
        config = config.disk(image);
    }
    let outcome = run(&config).expect("guest ran");
    outcome.assert_clean_success();

    let fio = outcome.read_out_file("fio.txt").expect("fio output");
    assert!(fio.contains("err= 0"), "fio reported errors: {fio}");
    for name in ["uring-fio.txt", "uring-mirror.txt"] {
        let fio = outcome.read_out_file(name).expect("io_uring fio output");
        assert!(fio.contains("err= 0"), "{name}: {fio}");
    }
    assert_eq!(
        outcome
            .read_out_file("uring-workers.txt")
            .expect("io_uring workers")
            .trim(),
        "0",
        "io_uring punted I/O on /dev/sanblk0 to io-wq workers: REQ_NOWAIT not taken inline"
    );
    assert_eq!(
        outcome
            .read_out_file("epoch-after-updates.txt")
            .expect("epoch")
            .trim(),
        "21"
    );
    let ext4 = outcome
        .read_out_file("ext4-verify.txt")
        .expect("ext4 verify");
    assert_eq!(ext4.matches(": OK").count(), 4, "{ext4}");
    let status = outcome.read_out_file("status.txt").expect("status");
    assert!(status.contains("volume_count=3"), "{status}");
    assert_eq!(
        outcome.read_out_file("sysfs.txt").expect("sysfs"),
        "lin 1 1\nmir 2 1\nstr 3 1\n"
    );
    let busy = outcome.read_out_file("busy-destroy.txt").expect("busy");
    assert!(
        busy.contains("errno=16") || busy.contains("in use"),
        "{busy}"
    );
    assert!(outcome
        .read_out_file("busy-fio.txt")
        .expect("busy fio")
        .contains("err= 0"));

    verify_block_statistics(
        &outcome
            .read_out_file("stat-before.txt")
            .expect("stat before"),
        &outcome.read_out_file("stat-after.txt").expect("stat after"),
    );

    verify_layout("linear", &linear, &pattern(11, VOLUME));
    verify_layout("mirror", &mirror, &pattern(22, VOLUME));
    verify_layout("striped", &striped, &pattern(33, VOLUME));
}

/// A map whose extents are all syncing (the server is copying them), on a volume without a
/// server path: reads go to the members as usual, writes fail with EIO rather than reach the
/// old place alone, and discards complete without reaching the devices. The next epoch's map
/// without the flag takes writes directly again.
#[test]
fn syncing_extents_are_read_directly_but_not_written_without_a_server() {
    let dir = scratch_dir("syncing").expect("scratch dir");
    let disks = images(&dir, "sync");
    let before = pattern(44, VOLUME);
    let after = pattern(55, VOLUME);
    // The host puts the first pattern where the linear layout keeps it (two halves).
    for half in [0, VOLUME / 2] {
        use std::os::unix::fs::FileExt;
        let (image, offset) = locations("linear", half)[0];
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&disks[image])
            .expect("open image");
        let data = &before[half as usize..(half + VOLUME / 2) as usize];
        file.write_all_at(data, offset).expect("write image");
    }
    fs::write(dir.join("before.pattern"), &before).expect("pattern");
    fs::write(dir.join("after.pattern"), &after).expect("pattern");
    let probe = target_bin("sanblk-nlprobe").display().to_string();
    let script = format!(
        r#"set -ex
insmod {module}
P={probe}
D={dir}
$P create syn 1 1 linear+sync 16 /dev/vda /dev/vdb
dd if=/dev/sanblk0 of=/tmp/back bs=1M iflag=direct status=none
cmp /tmp/back $D/before.pattern
if dd if=$D/after.pattern of=/dev/sanblk0 bs=4k count=1 oflag=direct status=none 2> write.txt; then
    echo "a write to a syncing extent went through without a server"; exit 7
fi
if dd if=$D/after.pattern of=/dev/sanblk0 bs=4k count=1 seek=3000 oflag=direct status=none; then
    echo "a write to the second syncing extent went through"; exit 7
fi
cat /sys/block/vda/stat /sys/block/vdb/stat > discards-before.txt
blkdiscard -o 0 -l 16777216 /dev/sanblk0
cat /sys/block/vda/stat /sys/block/vdb/stat > discards-after.txt
dd if=/dev/sanblk0 of=/tmp/back bs=1M iflag=direct status=none
cmp /tmp/back $D/before.pattern
# The next epoch, the copy done: writes go direct again.
$P update syn 1 2 linear 16 /dev/vda /dev/vdb
blkdiscard -o 0 -l 1048576 /dev/sanblk0
cat /sys/block/vda/stat /sys/block/vdb/stat > discards-direct.txt
dd if=$D/after.pattern of=/dev/sanblk0 bs=1M oflag=direct conv=fsync status=none
$P destroy 1
rmmod sanblk
"#,
        module = module_path().display(),
        dir = dir.display(),
    );
    let config = VmConfig::new("datapath-syncing", &script)
        .disk(&disks[0])
        .disk(&disks[1]);
    let outcome = run(&config).expect("guest ran");
    outcome.assert_clean_success();
    let write = outcome.read_out_file("write.txt").expect("write.txt");
    assert!(
        write.contains("I/O error") || write.contains("Input/output error"),
        "{write}"
    );
    // Documentation/block/stat.rst: field 12 counts discard I/Os; none reached the devices.
    let discards = |name: &str| -> Vec<u64> {
        outcome
            .read_out_file(name)
            .expect(name)
            .lines()
            .map(|line| {
                line.split_whitespace()
                    .nth(11)
                    .and_then(|f| f.parse().ok())
                    .unwrap_or(0)
            })
            .collect()
    };
    assert_eq!(
        discards("discards-before.txt"),
        discards("discards-after.txt")
    );
    // The same count does see a discard issued once the extent is no longer syncing.
    assert!(
        discards("discards-direct.txt")[0] > discards("discards-after.txt")[0],
        "{:?}",
        discards("discards-direct.txt")
    );
    verify_layout("linear", &disks, &after);
}

#[test]
fn hostile_maps_are_refused_and_change_nothing() {
    let dir = scratch_dir("hostile-maps").expect("scratch dir");
    let disks = images(&dir, "disk");
    let probe = target_bin("sanblk-nlprobe").display().to_string();
    let script = format!(
        r#"set -ex
insmod {module}
{probe} hostile-maps /dev/vda /dev/vdb > hostile.txt || true
{probe} status > status.txt
# The volume that was attached keeps working.
dd if=/dev/urandom of=/tmp/data bs=4k count=64 status=none
dd if=/tmp/data of=/dev/sanblk0 bs=4k oflag=direct status=none
dd if=/dev/sanblk0 of=/tmp/back bs=4k count=64 iflag=direct status=none
cmp /tmp/data /tmp/back
{probe} destroy 77
rmmod sanblk
"#,
        module = module_path().display(),
    );
    let config = VmConfig::new("datapath-hostile-maps", &script)
        .disk(&disks[0])
        .disk(&disks[1]);
    let outcome = run(&config).expect("guest ran");
    outcome.assert_clean_success();
    let hostile = outcome.read_out_file("hostile.txt").expect("hostile.txt");
    let expected_cases = [
        "overlapping-extents",
        "extents-share-device-space",
        "offset-overflow",
        "beyond-device-end",
        "unknown-device-index",
        "unknown-extent-flag",
        "unknown-extent-flag-high",
        "device-smaller-than-map",
        "truncated-map",
        "map-for-another-volume",
        "epoch-attribute-mismatch",
        "nonexistent-device-path",
        "too-few-device-paths",
        "devices-without-nested-flag",
        "bad-volume-name",
        "bad-server-address",
        "server-port-zero",
        "too-many-servers",
        "duplicate-create",
        "epoch-regression",
        "epoch-repeat",
        "update-unknown-extent-flag",
        "update-empty-token",
        "update-oversized-token",
        "set-state-unknown-device",
        "set-state-wrong-volume",
        "set-state-failed",
        "set-state-bad-state",
    ];
    for case in expected_cases {
        let line = hostile
            .lines()
            .find(|l| l.starts_with(&format!("case={case} ")))
            .unwrap_or_else(|| panic!("case {case} missing: {hostile}"));
        assert!(line.contains("errno="), "{case} not refused: {line}");
        assert!(
            !line.ends_with("msg="),
            "{case} has no extack message: {line}"
        );
    }
    let errno_of = |case: &str| -> Option<i32> {
        let line = hostile
            .lines()
            .find(|l| l.starts_with(&format!("case={case} ")))?;
        line.split("errno=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    const ENOENT: i32 = 2;
    const EINVAL: i32 = 22;
    const ERANGE: i32 = 34;
    assert_eq!(errno_of("update-empty-token"), Some(EINVAL));
    assert!(matches!(
        errno_of("update-oversized-token"),
        Some(EINVAL | ERANGE)
    ));
    assert_eq!(errno_of("set-state-unknown-device"), Some(ENOENT));
    assert_eq!(errno_of("set-state-wrong-volume"), Some(ENOENT));
    assert_eq!(errno_of("set-state-failed"), Some(EINVAL));
    assert_eq!(errno_of("set-state-bad-state"), Some(EINVAL));
    // Extent flags the module does not know (a newer or hostile map) and invalid
    // copy-on-write chunk sizes are refused, on CREATE and on UPDATE_MAP of the live volume,
    // with the validator's reason.
    let unknown_flags = [
        "unknown-extent-flag",
        "unknown-extent-flag-high",
        "update-unknown-extent-flag",
    ];
    let bad_cow = [
        "cow-chunk-not-power-of-two",
        "cow-chunk-below-block",
        "cow-chunk-absurd",
        "cow-chunk-without-generation",
        "cow-generation-without-chunk",
        "update-bad-cow-chunk",
    ];
    // A COW store section the module could be led to write over data with, copy into one
    // store twice with, or lay a store's slots out wrongly with.
    let bad_store = [
        "cow-store-beyond-device",
        "cow-store-other-snapshot",
        "cow-store-without-cow",
        "cow-store-misaligned",
        "cow-store-same-snapshot-twice",
        "cow-store-chunk-below-map",
        "cow-store-chunk-not-power-of-two",
        "cow-store-chunk-absurd",
        "cow-store-reserved-set",
    ];
    let reasons = unknown_flags
        .iter()
        .map(|case| (case, "map extent has unknown flags"))
        .chain(
            bad_cow
                .iter()
                .map(|case| (case, "map copy-on-write chunk size invalid")),
        )
        .chain(
            bad_store
                .iter()
                .map(|case| (case, "map COW store section invalid")),
        )
        .chain(
            [
                &"cow-store-over-volume-data",
                &"cow-store-overlapping-another",
            ]
            .map(|case| (case, "map extents overlap on a device")),
        );
    for (case, reason) in reasons {
        assert_eq!(errno_of(case), Some(EINVAL), "{case}: {hostile}");
        assert!(
            hostile
                .lines()
                .any(|l| l.starts_with(&format!("case={case} "))
                    && l.ends_with(&format!("msg={reason}"))),
            "{case} without its extack message: {hostile}"
        );
    }
    assert!(
        hostile.contains("case=valid-token-and-state accepted-as-expected"),
        "a valid token update or SET_DEVICE_STATE was refused: {hostile}"
    );
    let status = outcome.read_out_file("status.txt").expect("status");
    assert!(status.contains("volume_count=1"), "{status}");
}

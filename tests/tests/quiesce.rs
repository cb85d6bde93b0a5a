//! End-to-end tests of the module's hold queue: QUIESCE/RESUME around a configuration change,
//! leases (lapse holds I/O, RENEW releases it) and the I/O timeout of held bios, driven over
//! netlink by the guest probe (no server), with the real module in a QEMU guest. Where data
//! landed is checked on the host in the image files after the guest exits; what the guest saw
//! while I/O was held (direct reads of the SAN device, STATUS) is written to files.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use sanblk_tests::{
    blocks, module_path, probe, run, scratch_dir, sparse_image, target_bin, GuestOutcome, VmConfig,
};

const MIB: u64 = 1 << 20;
const IMAGE: u64 = 32 * MIB;
/// One write of the tests: 64 KiB.
const CHUNK: u64 = 65536;

const ENOENT: i32 = 2;
const EINVAL: i32 = 22;
const EBUSY: i32 = 16;
const ESTALE: i32 = 116;

/// Runs `body` in a guest named `name` with `disks` attached, after loading the module and
/// setting `$P` to the probe; the guest must succeed without a kernel splat.
fn guest(name: &str, disks: &[PathBuf], body: &str) -> GuestOutcome {
    let script = format!(
        "set -ex\ninsmod {module}\nP={probe}\n{body}",
        module = module_path().display(),
        probe = target_bin("sanblk-nlprobe").display(),
    );
    let mut config = VmConfig::new(name, &script);
    for disk in disks {
        config = config.disk(disk);
    }
    let outcome = run(&config).expect("guest ran");
    outcome.assert_clean_success();
    outcome
}

fn images(dir: &Path, count: usize) -> Vec<PathBuf> {
    (0..count)
        .map(|i| {
            let path = dir.join(format!("san-{i}.img"));
            sparse_image(&path, IMAGE).expect("image");
            path
        })
        .collect()
}

fn read_at(image: &Path, offset: u64, len: u64) -> Vec<u8> {
    blocks::read_at(image, offset, len).expect("read image")
}

/// The `volume key=value ...` lines of `sanblk-nlprobe volumes`, one map per volume.
fn volumes(text: &str) -> Vec<HashMap<String, String>> {
    text.lines()
        .filter_map(|l| l.strip_prefix("volume "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// The single volume of a `volumes` file.
fn only_volume(outcome: &GuestOutcome, file: &str) -> HashMap<String, String> {
    let text = outcome.read_out_file(file).expect(file);
    let mut list = volumes(&text);
    assert_eq!(list.len(), 1, "{file}: {text}");
    list.remove(0)
}

/// The command in `command_file` (RESUME or RENEW) was taken, and the held write that it
/// released completed without error (`dd-exit.txt`, `dd.err`).
fn assert_released(outcome: &GuestOutcome, command_file: &str) {
    let answer = outcome.read_out_file(command_file).expect(command_file);
    assert_eq!(answer.trim(), "ok", "{command_file}");
    let exit = outcome.read_out_file("dd-exit.txt").expect("dd exit");
    let errors = outcome.read_out_file("dd.err").unwrap_or_default();
    assert_eq!(exit.trim(), "0", "{errors}");
}

fn field(volume: &HashMap<String, String>, key: &str) -> u64 {
    volume
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key} in {volume:?}"))
}

/// A scratch directory for test `name` with `count` SAN disk images and a `CHUNK`-byte
/// pattern file of `seed` for the guest to write: (images, pattern file).
fn setup(name: &str, count: usize, seed: u8) -> (Vec<PathBuf>, PathBuf) {
    let dir = scratch_dir(name).expect("scratch dir");
    let pattern = dir.join(format!("pattern-{seed}"));
    fs::write(&pattern, blocks::pattern("quiesce", seed, CHUNK)).expect("pattern");
    (images(&dir, count), pattern)
}

#[test]
fn hostile_lease_commands_are_refused_and_change_nothing() {
    let dir = scratch_dir("quiesce-hostile").expect("scratch dir");
    let disks = images(&dir, 2);
    let outcome = guest(
        "quiesce-hostile",
        &disks,
        r#"$P hostile-lease /dev/vda > hostile.txt
$P volumes > after.txt
rmmod sanblk
"#,
    );

    let hostile = outcome.read_out_file("hostile.txt").expect("hostile.txt");
    let cases = probe::cases(&hostile);
    let errno_of = |case: &str| probe::errno_of(&cases, case, &hostile);
    for (case, errno) in [
        ("quiesce-unknown-volume", ENOENT),
        ("quiesce-stale-epoch", ESTALE),
        ("quiesce-future-epoch", ESTALE),
        ("quiesce-missing-epoch", EINVAL),
        ("resume-not-quiesced", EINVAL),
        ("resume-stale-epoch", ESTALE),
        ("resume-unknown-volume", ENOENT),
        ("renew-unknown-volume", ENOENT),
        ("renew-stale-epoch", ESTALE),
        ("renew-absurd-deadline", EINVAL),
        ("renew-missing-deadline", EINVAL),
        ("create-without-lease", EINVAL),
        ("create-io-timeout-too-small", EINVAL),
        ("create-io-timeout-too-large", EINVAL),
        ("create-absurd-lease", EINVAL),
        ("update-map-absurd-lease", EINVAL),
    ] {
        assert_eq!(errno_of(case), errno, "{case}: {hostile}");
    }
    // Every refusal says why.
    assert!(cases["create-without-lease"].contains("CREATE needs attribute LEASE_EXPIRES_NS"));
    assert!(cases["resume-not-quiesced"].contains("volume is not quiesced"));
    assert!(cases["create-io-timeout-too-small"].contains("IO_TIMEOUT_MS 999"));
    assert!(cases["quiesce-stale-epoch"].contains("not the current epoch 3"));

    // Nothing changed: one volume, at its epoch, not held, default I/O timeout, a lease of
    // about 30 minutes (no refused RENEW extended it to two hours).
    let after_cases: Vec<_> = volumes(&hostile);
    assert_eq!(after_cases.len(), 1, "{hostile}");
    let volume = &after_cases[0];
    assert_eq!(field(volume, "id"), 90);
    assert_eq!(field(volume, "epoch"), 3);
    assert_eq!(field(volume, "hold_reason"), 0);
    assert_eq!(field(volume, "held_ios"), 0);
    assert_eq!(field(volume, "timed_out_ios"), 0);
    assert_eq!(field(volume, "io_timeout_ms"), 60_000);
    let remaining = field(volume, "lease_remaining_ms");
    assert!(
        (25 * 60_000..=30 * 60_000).contains(&remaining),
        "lease {remaining} ms: {hostile}"
    );

    // The valid sequence: QUIESCE and its repetition, RESUME, then RESUME refused once the
    // volume is no longer quiesced; a RENEW with a deadline already past is taken and does
    // not shorten the lease.
    for (name, expected) in [
        ("quiesce", "ok"),
        ("quiesce-repeat", "ok"),
        ("resume", "ok"),
        ("renew-past", "ok"),
    ] {
        assert!(
            hostile.contains(&format!("valid={name} {expected}")),
            "{name}: {hostile}"
        );
    }
    assert!(
        hostile.contains(&format!("valid=resume-again errno={EINVAL} ")),
        "{hostile}"
    );
    let after = only_volume(&outcome, "after.txt");
    assert_eq!(field(&after, "hold_reason"), 0, "{after:?}");
    assert!(
        field(&after, "lease_remaining_ms") >= 25 * 60_000,
        "{after:?}"
    );
}

#[test]
fn quiesce_holds_writes_until_resume_with_the_new_map() {
    let (disks, pattern) = setup("quiesce-hold", 2, 7);
    // Volume offset 6 MiB: with epoch 1 (one device) at image 0 offset 7 MiB; with epoch 2
    // (two devices, second half on the second) at image 1 offset 3 + 2 MiB.
    let body = format!(
        r#"# Held bios fail after the volume's I/O timeout: give a slow guest ten minutes.
SANBLK_IO_TIMEOUT_MS=600000 $P create vol 1 1 linear 8 /dev/vda
$P quiesce 1 1 > quiesce.txt
dd if={pattern} of=/dev/sanblk0 bs=64k seek=96 count=1 oflag=direct 2> dd.err &
DD=$!
# io_uring issues REQ_NOWAIT bios: refused with BLK_STS_AGAIN while held, re-issued by
# io_uring from a worker that may wait, held like the others; fio sees no error.
fio --name=held --filename=/dev/sanblk0 --rw=write --bs=4k --size=64k --offset=1M --direct=1 \
    --ioengine=io_uring --iodepth=4 --output=fio.txt &
FIO=$!
# fio takes a while to start under TCG: wait until its bios are held too.
for i in $(seq 150); do
    $P volumes > held.txt
    grep -q "held_ios=[2-9]" held.txt && break
    sleep 0.2
done
kill -0 $DD && echo running > dd-while-quiesced.txt
# The configuration change: a new epoch installed while quiesced keeps holding.
$P update vol 1 2 linear 8 /dev/vda /dev/vdb
sleep 1
$P volumes > held-after-update.txt
kill -0 $DD && echo running >> dd-while-quiesced.txt
dd if=/dev/vda bs=64k skip=112 count=1 iflag=direct status=none > old-place-quiesced.bin
dd if=/dev/vdb bs=64k skip=80 count=1 iflag=direct status=none > new-place-quiesced.bin
$P resume 1 1 > resume-stale.txt || true
kill -0 $FIO && echo running > fio-while-quiesced.txt
$P resume 1 2 > resume.txt
rc=0
wait $DD || rc=$?
echo $rc > dd-exit.txt
wait $FIO
$P volumes > resumed.txt
dd if=/dev/vdb bs=64k skip=80 count=1 iflag=direct status=none > new-place-resumed.bin
$P destroy 1
rmmod sanblk
"#,
        pattern = pattern.display(),
    );
    let outcome = guest("quiesce-hold", &disks, &body);

    let expected = fs::read(&pattern).expect("pattern");
    let out = |name: &str| fs::read(outcome.out_file(name)).expect(name);
    assert_eq!(
        outcome
            .read_out_file("quiesce.txt")
            .expect("quiesce")
            .trim(),
        "ok"
    );
    assert_eq!(
        outcome
            .read_out_file("dd-while-quiesced.txt")
            .expect("dd state")
            .lines()
            .count(),
        2,
        "dd finished while the volume was quiesced"
    );
    for file in ["held.txt", "held-after-update.txt"] {
        let held = only_volume(&outcome, file);
        assert_eq!(field(&held, "hold_reason"), 1, "{file}: {held:?}");
        // dd's bio and at least one of fio's.
        assert!(field(&held, "held_ios") >= 2, "{file}: {held:?}");
    }
    assert!(outcome.out_file("fio-while-quiesced.txt").exists());
    let fio = outcome.read_out_file("fio.txt").expect("fio output");
    assert!(fio.contains("err= 0"), "fio saw errors: {fio}");
    // While quiesced, the data was nowhere on the SAN devices.
    assert!(out("old-place-quiesced.bin").iter().all(|b| *b == 0));
    assert!(out("new-place-quiesced.bin").iter().all(|b| *b == 0));
    assert!(
        outcome
            .read_out_file("resume-stale.txt")
            .expect("resume-stale")
            .starts_with(&format!("errno={ESTALE} ")),
        "RESUME with the replaced epoch was not refused"
    );
    // dd saw no error, and its bio was mapped with the epoch current at RESUME.
    assert_released(&outcome, "resume.txt");
    assert_eq!(out("new-place-resumed.bin"), expected);
    let resumed = only_volume(&outcome, "resumed.txt");
    assert_eq!(field(&resumed, "hold_reason"), 0);
    assert_eq!(field(&resumed, "held_ios"), 0);
    assert_eq!(field(&resumed, "epoch"), 2);
    assert_eq!(read_at(&disks[1], 5 * MIB, CHUNK), expected);
    assert!(
        read_at(&disks[0], 7 * MIB, CHUNK).iter().all(|b| *b == 0),
        "the held write went to the place of the old epoch"
    );
}

#[test]
fn lapsed_lease_holds_io_until_renew() {
    let (disks, pattern) = setup("quiesce-lease", 1, 9);
    let body = format!(
        r#"$P events 1 > events.txt &
EV=$!
until grep -q listening events.txt; do sleep 0.1; done
SANBLK_LEASE_MS=4000 $P create vol 1 1 linear 8 /dev/vda
# Within the lease I/O flows.
dd if={pattern} of=/dev/sanblk0 bs=64k count=1 oflag=direct status=none
sleep 5
$P volumes > lapsed.txt
dd if={pattern} of=/dev/sanblk0 bs=64k seek=1 count=1 oflag=direct 2> dd.err &
DD=$!
sleep 2
$P volumes > held.txt
kill -0 $DD && echo running > dd-while-lapsed.txt
dd if=/dev/vda bs=64k skip=17 count=1 iflag=direct status=none > lapsed-place.bin
$P renew 1 1 60000 > renew.txt
rc=0
wait $DD || rc=$?
echo $rc > dd-exit.txt
# The listener exits after the one event it waits for.
for i in $(seq 100); do kill -0 $EV 2>/dev/null || break; sleep 0.1; done
kill $EV 2>/dev/null || true
$P volumes > renewed.txt
$P destroy 1
rmmod sanblk
"#,
        pattern = pattern.display(),
    );
    let outcome = guest("quiesce-lease", &disks, &body);

    let expected = fs::read(&pattern).expect("pattern");
    let lapsed = only_volume(&outcome, "lapsed.txt");
    assert_eq!(field(&lapsed, "hold_reason"), 2, "{lapsed:?}");
    assert_eq!(field(&lapsed, "lease_remaining_ms"), 0, "{lapsed:?}");
    let held = only_volume(&outcome, "held.txt");
    assert_eq!(field(&held, "held_ios"), 1, "{held:?}");
    assert!(outcome.out_file("dd-while-lapsed.txt").exists());
    assert!(
        fs::read(outcome.out_file("lapsed-place.bin"))
            .expect("lapsed read")
            .iter()
            .all(|b| *b == 0),
        "a write went to the SAN device after the lease lapsed"
    );
    // LEASE_LAPSED was multicast for the volume.
    let events = outcome.read_out_file("events.txt").expect("events");
    assert!(
        events.contains("kind=3 volume_id=1"),
        "no LEASE_LAPSED event: {events}"
    );
    assert_released(&outcome, "renew.txt");
    let renewed = only_volume(&outcome, "renewed.txt");
    assert_eq!(field(&renewed, "hold_reason"), 0, "{renewed:?}");
    assert_eq!(field(&renewed, "held_ios"), 0, "{renewed:?}");
    assert!(
        field(&renewed, "lease_remaining_ms") > 30_000,
        "{renewed:?}"
    );
    assert_eq!(read_at(&disks[0], MIB, CHUNK), expected);
    assert_eq!(read_at(&disks[0], MIB + CHUNK, CHUNK), expected);
}

#[test]
fn held_io_fails_after_the_io_timeout_and_destroy_does_not_hang() {
    let (disks, pattern) = setup("quiesce-timeout", 3, 5);
    let body = format!(
        r#"SANBLK_IO_TIMEOUT_MS=1000 $P create vol 1 1 linear 8 /dev/vda
SANBLK_IO_TIMEOUT_MS=1000 $P create other 2 1 linear 8 /dev/vdb
$P quiesce 1 1
start=$(date +%s%N)
if dd if={pattern} of=/dev/sanblk0 bs=4k count=1 oflag=direct 2> dd-timeout.err; then
    echo succeeded > dd-timeout.txt
else
    echo failed > dd-timeout.txt
fi
echo $(( ($(date +%s%N) - start) / 1000000 )) > dd-timeout-ms.txt
$P volumes > timed-out.txt
# DESTROY while a bio is held: refused at once (the disk is open), nothing hangs; the bio
# fails at its timeout and DESTROY then goes through, the volume still quiesced.
SANBLK_IO_TIMEOUT_MS=10000 $P create third 3 1 linear 8 /dev/vdc
$P quiesce 3 1
dd if={pattern} of=/dev/sanblk2 bs=4k count=1 oflag=direct 2> /dev/null &
DD=$!
sleep 1
$P volumes > busy.txt
start=$(date +%s%N)
$P destroy 3 2> destroy-busy.txt && echo destroyed-while-open >> destroy-busy.txt
echo $(( ($(date +%s%N) - start) / 1000000 )) > destroy-busy-ms.txt
kill -0 $DD && echo running > dd-after-busy-destroy.txt
if wait $DD; then echo succeeded > dd-second.txt; else echo failed > dd-second.txt; fi
start=$(date +%s%N)
$P destroy 3
$P destroy 1
echo $(( ($(date +%s%N) - start) / 1000000 )) > destroy-ms.txt
# Module unload with a quiesced volume attached tears it down.
$P quiesce 2 1
rmmod sanblk
test ! -e /dev/sanblk1
"#,
        pattern = pattern.display(),
    );
    let outcome = guest("quiesce-timeout", &disks, &body);

    let text = |name: &str| outcome.read_out_file(name).expect(name);
    assert_eq!(text("dd-timeout.txt").trim(), "failed");
    assert!(
        text("dd-timeout.err").contains("Input/output error"),
        "{}",
        text("dd-timeout.err")
    );
    let waited: u64 = text("dd-timeout-ms.txt").trim().parse().expect("ms");
    // At least the timeout, at most a quarter more plus the thread's wake-up and dd.
    assert!(
        (1000..4000).contains(&waited),
        "held write failed after {waited} ms"
    );
    let both = volumes(&text("timed-out.txt"));
    assert_eq!(both.len(), 2, "{both:?}");
    let volume_1 = both
        .iter()
        .find(|v| v.get("id").map(String::as_str) == Some("1"))
        .expect("volume 1");
    assert_eq!(field(volume_1, "timed_out_ios"), 1, "{volume_1:?}");
    assert_eq!(field(volume_1, "held_ios"), 0, "{volume_1:?}");
    assert_eq!(field(volume_1, "hold_reason"), 1, "{volume_1:?}");
    assert_eq!(field(volume_1, "io_timeout_ms"), 1000, "{volume_1:?}");
    let held = volumes(&text("busy.txt"));
    let volume_3 = held
        .iter()
        .find(|v| v.get("id").map(String::as_str) == Some("3"))
        .expect("volume 3");
    assert_eq!(field(volume_3, "held_ios"), 1, "{volume_3:?}");
    let busy = text("destroy-busy.txt");
    assert!(
        busy.contains(&format!("errno {EBUSY}")),
        "DESTROY of an open volume: {busy}"
    );
    // DESTROY answered while the bio was still held (it did not wait for its timeout).
    let busy_ms: u64 = text("destroy-busy-ms.txt").trim().parse().expect("ms");
    assert!(busy_ms < 8000, "DESTROY waited {busy_ms} ms");
    assert!(outcome.out_file("dd-after-busy-destroy.txt").exists());
    assert_eq!(text("dd-second.txt").trim(), "failed");
    let destroy_ms: u64 = text("destroy-ms.txt").trim().parse().expect("ms");
    assert!(
        destroy_ms < 10_000,
        "DESTROY of quiesced volumes took {destroy_ms} ms"
    );
    // Nothing held ever reached the SAN device.
    assert!(read_at(&disks[0], MIB, CHUNK).iter().all(|b| *b == 0));
}

#[test]
fn quiesce_waits_for_in_flight_io_and_times_out_after_the_io_timeout() {
    let (disks, pattern) = setup("quiesce-drain", 1, 3);
    // The SAN device is dm-delay over /dev/vda: every bio takes 2 s, later 8 s.
    let body = format!(
        r#"SECTORS=$(blockdev --getsz /dev/vda)
dmsetup create slow --table "0 $SECTORS delay /dev/vda 0 2000"
SANBLK_IO_TIMEOUT_MS=4000 $P create vol 1 1 linear 8 /dev/mapper/slow
dd if={pattern} of=/dev/sanblk0 bs=64k count=1 oflag=direct 2> dd.err &
DD=$!
sleep 0.5
$P quiesce 1 1 > quiesce.txt
# QUIESCE answered once the write was done: it is on the disk now.
dd if=/dev/vda bs=64k skip=16 count=1 iflag=direct status=none > after-quiesce.bin
wait $DD
$P resume 1 1
# A bio slower than the I/O timeout: QUIESCE gives up with ETIMEDOUT, the volume stays
# quiesced; once the bio is done, QUIESCE again succeeds.
dmsetup suspend slow
dmsetup reload slow --table "0 $SECTORS delay /dev/vda 0 8000"
dmsetup resume slow
dd if={pattern} of=/dev/sanblk0 bs=64k seek=1 count=1 oflag=direct 2> dd-slow.err &
DD=$!
sleep 0.5
$P quiesce 1 1 > quiesce-timeout.txt || true
$P volumes > after-timeout.txt
wait $DD
$P quiesce 1 1 > quiesce-again.txt
$P resume 1 1
$P destroy 1
dmsetup remove slow
rmmod sanblk
"#,
        pattern = pattern.display(),
    );
    let outcome = guest("quiesce-drain", &disks, &body);

    let expected = fs::read(&pattern).expect("pattern");
    let text = |name: &str| outcome.read_out_file(name).expect(name);
    assert_eq!(text("quiesce.txt").trim(), "ok");
    assert_eq!(
        fs::read(outcome.out_file("after-quiesce.bin")).expect("read after quiesce"),
        expected,
        "QUIESCE answered before the write in flight was done"
    );
    const ETIMEDOUT: i32 = 110;
    assert!(
        text("quiesce-timeout.txt").starts_with(&format!("errno={ETIMEDOUT} ")),
        "{}",
        text("quiesce-timeout.txt")
    );
    let after = only_volume(&outcome, "after-timeout.txt");
    assert_eq!(field(&after, "hold_reason"), 1, "{after:?}");
    assert_eq!(text("quiesce-again.txt").trim(), "ok");
    assert_eq!(read_at(&disks[0], MIB + CHUNK, CHUNK), expected);
}

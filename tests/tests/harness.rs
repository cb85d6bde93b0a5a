//! End-to-end checks of the QEMU harness itself: real guests, real kernel.
//! Each test fails if the harness feature it covers is broken.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use sanblk_tests::{
    run, scratch_dir, sparse_image, spawn, Disk, HarnessError, VmConfig, GUEST_OUT_DIR,
};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;

/// A 4 KiB block whose bytes depend on `label`, so blocks written by different parties differ.
fn pattern_block(label: &str) -> Vec<u8> {
    let line = format!("sanblk pattern {label}\n");
    line.bytes().cycle().take(BLOCK).collect()
}

fn read_block(image: &Path, offset: u64) -> Vec<u8> {
    let mut file = File::open(image).expect("open disk image");
    file.seek(SeekFrom::Start(offset)).expect("seek disk image");
    let mut block = vec![0u8; BLOCK];
    file.read_exact(&mut block).expect("read disk image");
    block
}

#[test]
fn boots_and_runs_script_on_the_project_kernel() {
    // The script runs in $SANBLK_OUT, which is the host's log directory; env() reaches it.
    let script = "uname -r > uname.txt\n\
                  printf '%s|%s|%s' \"$SANBLK_GREETING\" \"$SANBLK_OUT\" \"$PWD\" > env.txt\n";
    let config = VmConfig::new("boot", script).env("SANBLK_GREETING", "it's \"quoted\" $HOME");
    let outcome = run(&config).expect("guest run");
    outcome.assert_clean_success();
    assert_eq!(
        outcome
            .read_out_file("env.txt")
            .expect("guest wrote env.txt"),
        format!("it's \"quoted\" $HOME|{GUEST_OUT_DIR}|{GUEST_OUT_DIR}")
    );
    let release = outcome
        .read_out_file("uname.txt")
        .expect("guest wrote uname.txt");
    assert!(
        release.starts_with("6.12"),
        "guest kernel release {release:?}, expected 6.12.*"
    );
    eprintln!(
        "boot: script started at guest uptime {:?}, QEMU wall time {:?}",
        outcome.boot_time, outcome.wall_time
    );
}

#[test]
fn script_exit_code_is_reported() {
    let outcome = run(&VmConfig::new("exit7", "echo exiting with 7\nexit 7\n")).expect("guest run");
    assert_eq!(outcome.exit_code, 7, "log: {}", outcome.log_dir.display());
    assert!(outcome.splats.is_empty(), "splats: {:?}", outcome.splats);
    assert!(outcome.check_clean_success().is_err());
}

#[test]
fn kernel_warning_is_detected_as_splat() {
    let splat_line = "WARNING: CPU: 0 PID: 1 at sanblk-selftest";
    let script = format!("echo '{splat_line}' > /dev/kmsg\n");
    let outcome = run(&VmConfig::new("splat", &script)).expect("guest run");
    assert_eq!(outcome.exit_code, 0);
    assert!(
        outcome.splats.iter().any(|s| s.ends_with(splat_line)),
        "splat not detected; splats: {:?}, log: {}",
        outcome.splats,
        outcome.log_dir.display()
    );
    let report = outcome
        .check_clean_success()
        .expect_err("a splat must fail the run");
    assert!(
        report.contains(splat_line),
        "report lacks the splat: {report}"
    );
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        outcome.assert_clean_success()
    }));
    assert!(
        panicked.is_err(),
        "assert_clean_success must panic on a splat"
    );
}

#[test]
fn shared_disk_is_read_and_written_by_host_and_guest() {
    let dir = scratch_dir("shared-disk").expect("scratch dir");
    let image = dir.join("disk.img");
    sparse_image(&image, 16 * MIB).expect("create image");
    let host_block = pattern_block("written by host at 1 MiB");
    let guest_block = pattern_block("written by guest at 2 MiB");
    File::options()
        .write(true)
        .open(&image)
        .expect("open image")
        .write_all_at(&host_block, MIB)
        .expect("write host pattern");
    // The guest sees the host's files at the same paths (read-only root share).
    let host_expected = dir.join("host-block.bin");
    let guest_source = dir.join("guest-block.bin");
    fs::write(&host_expected, &host_block).expect("write expected block");
    fs::write(&guest_source, &guest_block).expect("write guest block");

    // A second disk attached through a raw -drive spec must become /dev/vdb.
    let second_image = dir.join("second.img");
    sparse_image(&second_image, 8 * MIB).expect("create second image");
    let second_spec = format!(
        "file={},format=raw,cache=none,file.locking=off",
        second_image.display()
    );

    let script = format!(
        "set -e\n\
         dd if=/dev/vda of=got.bin bs={BLOCK} skip=256 count=1 iflag=direct\n\
         cmp got.bin {expected}\n\
         dd if={source} of=/dev/vda bs={BLOCK} seek=512 count=1 oflag=direct conv=notrunc\n\
         dd if={source} of=/dev/vdb bs={BLOCK} count=1 oflag=direct conv=notrunc\n",
        expected = host_expected.display(),
        source = guest_source.display(),
    );
    let config = VmConfig::new("shared-disk", &script)
        .disk(&image)
        .disk_spec(Disk::RawDriveSpec(second_spec));
    let outcome = run(&config).expect("guest run");
    outcome.assert_clean_success();
    assert_eq!(
        read_block(&second_image, 0),
        guest_block,
        "guest write to /dev/vdb not in the second image"
    );
    assert_eq!(read_block(&image, MIB), host_block, "host block changed");
    assert_eq!(
        read_block(&image, 2 * MIB),
        guest_block,
        "guest write not in the image"
    );
    assert_eq!(
        read_block(&image, 3 * MIB),
        vec![0u8; BLOCK],
        "unexpected write"
    );
}

#[test]
fn guest_reaches_host_tcp_port() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().expect("local addr").port();
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    // Accept on a thread with its own deadline so a guest that never connects fails the test
    // instead of hanging it.
    let server = std::thread::spawn(move || -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(240);
        let (stream, _) = loop {
            match listener.accept() {
                Ok(connection) => break connection,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err("no connection from the guest".into());
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .map_err(|e| format!("read: {e}"))?;
        (&stream)
            .write_all(b"ack from host\n")
            .map_err(|e| format!("write: {e}"))?;
        Ok(line)
    });

    let script = format!(
        "echo 'hello from guest' | busybox nc {} {port} > reply.txt\n\
         grep -qx 'ack from host' reply.txt\n",
        sanblk_tests::HOST_ADDR_FROM_GUEST
    );
    let outcome = run(&VmConfig::new("tcp", &script).forward_port(port)).expect("guest run");
    let received = server.join().expect("server thread");
    assert_eq!(received, Ok("hello from guest\n".to_string()));
    outcome.assert_clean_success();
}

#[test]
fn two_guests_run_at_once_on_one_shared_disk() {
    let dir = scratch_dir("two-guests").expect("scratch dir");
    let image = dir.join("disk.img");
    sparse_image(&image, 16 * MIB).expect("create image");
    let mut guests = Vec::new();
    for (index, label) in ["a", "b"].iter().enumerate() {
        let block_path = dir.join(format!("block-{label}.bin"));
        fs::write(&block_path, pattern_block(label)).expect("write block");
        let script = format!(
            "dd if={} of=/dev/vda bs={BLOCK} seek={} count=1 oflag=direct conv=notrunc\n",
            block_path.display(),
            index * 256
        );
        let config = VmConfig::new(&format!("two-guests-{label}"), &script).disk(&image);
        guests.push(spawn(&config).expect("spawn guest"));
    }
    assert_ne!(guests[0].log_dir(), guests[1].log_dir());
    for guest in guests {
        guest.wait().expect("guest run").assert_clean_success();
    }
    let image_file = OpenOptions::new()
        .read(true)
        .open(&image)
        .expect("open image");
    for (index, label) in ["a", "b"].iter().enumerate() {
        let mut block = vec![0u8; BLOCK];
        image_file
            .read_exact_at(&mut block, index as u64 * MIB)
            .expect("read image");
        assert_eq!(block, pattern_block(label), "guest {label}'s block");
    }
}

#[test]
fn timeout_kills_qemu() {
    let config =
        VmConfig::new("timeout", "while :; do sleep 1; done\n").timeout(Duration::from_secs(20));
    let started = Instant::now();
    let error = run(&config).expect_err("a script that never ends must time out");
    let elapsed = started.elapsed();
    let HarnessError::Timeout { run: failed, .. } = error else {
        panic!("expected a timeout, got: {error}");
    };
    assert!(
        elapsed >= Duration::from_secs(20) && elapsed < Duration::from_secs(30),
        "timeout took {elapsed:?}"
    );
    assert!(
        !Path::new(&format!("/proc/{}", failed.qemu_pid)).exists(),
        "QEMU pid {} still exists",
        failed.qemu_pid
    );
}

#[test]
fn guest_crash_is_reported_as_missing_exit_marker() {
    // Crash the kernel from the script: there is no exit code, and the panic is a splat.
    let config = VmConfig::new("crash", "echo c > /proc/sysrq-trigger\nsleep 60\n");
    match run(&config) {
        Err(HarnessError::NoExitMarker { run: failed, .. }) => assert!(
            !failed.splats.is_empty(),
            "the crash must show up as a splat; log tail:\n{}",
            failed.log_tail
        ),
        Err(other) => panic!("expected NoExitMarker, got: {other}"),
        Ok(outcome) => panic!("expected NoExitMarker, got exit code {}", outcome.exit_code),
    }
}

/// Debugging aid, not a check: boots a guest running `$SANBLK_PROBE_SCRIPT` and prints its
/// serial log. `SANBLK_PROBE_SCRIPT='cat /proc/mounts' cargo test -p sanblk-tests --test harness
/// probe -- --ignored --nocapture`
#[test]
#[ignore = "debugging aid; needs SANBLK_PROBE_SCRIPT"]
fn probe() {
    let script = std::env::var("SANBLK_PROBE_SCRIPT").expect("set SANBLK_PROBE_SCRIPT");
    let outcome = run(&VmConfig::new("probe", &script)).expect("guest run");
    println!("{}", outcome.serial_log);
    println!(
        "exit code {}, splats {:?}",
        outcome.exit_code, outcome.splats
    );
}

#[test]
fn qemu_failure_is_reported_with_its_output() {
    let missing = Path::new("/nonexistent/sanblk-missing.img");
    let config = VmConfig::new("bad-drive", "true\n").disk_spec(Disk::RawDriveSpec(format!(
        "file={},format=raw",
        missing.display()
    )));
    match run(&config) {
        Err(HarnessError::NoExitMarker { qemu_stderr, .. }) => assert!(
            qemu_stderr.contains("sanblk-missing.img"),
            "QEMU's complaint should name the image: {qemu_stderr}"
        ),
        Err(other) => panic!("expected NoExitMarker, got: {other}"),
        Ok(outcome) => panic!(
            "expected a QEMU failure, got exit code {}",
            outcome.exit_code
        ),
    }
}

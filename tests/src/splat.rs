//! Finds kernel "splats" (warnings, oopses, sanitizer and lockdep reports, stalls) in a guest's
//! serial log. Any splat fails a test, even when the guest script succeeded.
//!
//! Only kernel log lines are considered: with `CONFIG_PRINTK_TIME=y` every printk line on the
//! console carries a `[    1.234567]` timestamp, while output of guest programs (which also
//! goes to the console) does not. So a test program printing "WARNING: ..." is not a splat, but
//! `echo "WARNING: ..." > /dev/kmsg` is, exactly like a real kernel report.

/// A message (the text after the printk timestamp) that starts with one of these is a splat.
const SPLAT_PREFIXES: &[&str] = &[
    // WARN_ON and the lockdep report headers ("WARNING: possible circular locking ...").
    "WARNING:",
    // BUG_ON, "BUG: KASAN: ...", "BUG: sleeping function called from invalid context", ...
    "BUG:",
    "Oops",
    "Call Trace:",
    // Hung-task and lockdep notes: "INFO: task foo:12 blocked for more than 60 seconds.",
    "INFO: ",
    "kernel BUG at",
];

/// A message that contains one of these anywhere is a splat (they often follow a subsystem
/// prefix such as "watchdog: BUG: soft lockup" or "rcu: INFO: rcu_sched self-detected stall").
const SPLAT_SUBSTRINGS: &[&str] = &[
    "KASAN",
    "possible circular locking dependency",
    "possible recursive locking",
    "inconsistent lock state",
    "suspicious RCU usage",
    "general protection fault",
    "Kernel panic",
    "UBSAN",
    "self-detected stall",
    "detected stalls on CPUs",
    "rcu: INFO",
    "soft lockup",
    "hard LOCKUP",
    "refcount_t:",
    "list_add corruption",
    "list_del corruption",
    "Unable to handle kernel",
    "blocked for more than",
];

/// Kernel messages that contain a splat word but are normal boot output.
const BENIGN_MESSAGES: &[&str] = &["kasan: KernelAddressSanitizer initialized"];

/// Returns every kernel log line of `log` that reports a splat, trimmed, in log order.
pub fn find_splats(log: &str) -> Vec<String> {
    log.lines()
        .filter(|line| {
            kernel_message(line).is_some_and(|message| {
                !is_benign(message)
                    && (SPLAT_PREFIXES.iter().any(|p| message.starts_with(p))
                        || SPLAT_SUBSTRINGS.iter().any(|s| message.contains(s)))
            })
        })
        .map(|line| line.trim().to_string())
        .collect()
}

/// True if the log has at least one timestamped kernel line. Without timestamps (a kernel
/// built without `CONFIG_PRINTK_TIME`) `find_splats` would see nothing, so the harness checks.
pub fn has_kernel_timestamps(log: &str) -> bool {
    log.lines().any(|line| kernel_message(line).is_some())
}

fn is_benign(message: &str) -> bool {
    BENIGN_MESSAGES.iter().any(|b| message.starts_with(b))
}

/// The message part of a kernel log line: the text after the first `[ seconds.micros]`
/// timestamp. The timestamp is searched anywhere in the line because guest program output
/// without a trailing newline can precede a kernel line on the same console line.
pub(crate) fn kernel_message(line: &str) -> Option<&str> {
    let mut search_from = 0;
    while let Some(open) = line[search_from..].find('[') {
        let start = search_from + open;
        if let Some(message) = strip_timestamp(&line[start..]) {
            return Some(strip_caller_id(message.trim_start()));
        }
        search_from = start + 1;
    }
    None
}

/// Drops the `[    T123]` / `[     C1]` field that `CONFIG_PRINTK_CALLER` adds after the
/// timestamp, so prefix patterns still match the message itself.
fn strip_caller_id(message: &str) -> &str {
    let caller = message.strip_prefix('[').and_then(|rest| {
        let close = rest.find(']')?;
        let id = rest[..close].trim_start();
        let digits = id.strip_prefix('T').or_else(|| id.strip_prefix('C'))?;
        (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| rest[close + 1..].trim_start())
    });
    caller.unwrap_or(message)
}

/// If `text` starts with `[<spaces><digits>.<digits>]`, returns what follows.
fn strip_timestamp(text: &str) -> Option<&str> {
    let inner = text.strip_prefix('[')?;
    let close = inner.find(']')?;
    let (seconds, micros) = inner[..close].trim_start().split_once('.')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if all_digits(seconds) && all_digits(micros) {
        Some(&inner[close + 1..])
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_splat(line: &str) {
        let found = find_splats(line);
        assert_eq!(
            found,
            vec![line.trim().to_string()],
            "should be a splat: {line:?}"
        );
    }

    fn assert_no_splat(line: &str) {
        assert!(
            find_splats(line).is_empty(),
            "should not be a splat: {line:?}"
        );
    }

    #[test]
    fn kernel_reports_are_splats() {
        for line in [
            "[    5.123456] WARNING: CPU: 0 PID: 1 at sanblk-selftest",
            "[   12.000001] WARNING: CPU: 1 PID: 77 at kmod/src/queue.rs:88 sanblk::queue+0x12/0x40",
            "[    3.100000] WARNING: possible circular locking dependency detected",
            "[    3.100000] WARNING: possible recursive locking detected",
            "[    3.100000] WARNING: inconsistent lock state",
            "[    3.100000] WARNING: suspicious RCU usage",
            "[    7.000000] BUG: KASAN: slab-use-after-free in sanblk_complete+0x1c/0x80",
            "[    7.000000] BUG: kernel NULL pointer dereference, address: 0000000000000008",
            "[    7.000000] BUG: sleeping function called from invalid context at mm/slab.c:1",
            "[    7.000000] Oops: general protection fault, probably for non-canonical address",
            "[    7.000000] Oops: 0002 [#1] PREEMPT SMP KASAN",
            "[    7.000000] general protection fault, probably for non-canonical address 0xdead",
            "[    7.000000] Kernel panic - not syncing: Fatal exception",
            "[    7.000000] ---[ end Kernel panic - not syncing: Fatal exception ]---",
            "[    7.000000] Call Trace:",
            "[    7.000000] UBSAN: array-index-out-of-bounds in drivers/block/foo.c:12:3",
            "[   70.000000] rcu: INFO: rcu_sched self-detected stall on CPU",
            "[   70.000000] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
            "[   70.000000] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [fio:321]",
            "[   70.000000] INFO: task sanctl:99 blocked for more than 60 seconds.",
            "[   70.000000] INFO: lockdep is turned off.",
            "[    7.000000] refcount_t: underflow; use-after-free.",
            "[    7.000000] list_add corruption. prev->next should be next (ffff8880), but was 0",
            "[    7.000000] list_del corruption, ffff888003a0 -> next is LIST_POISON1",
            "[    7.000000] BUG: unable to handle page fault for address: ffffed1000000000",
            "[    7.000000] Unable to handle kernel paging request at virtual address 0",
        ] {
            assert_splat(line);
        }
    }

    #[test]
    fn kernel_message_after_program_output_on_same_line_is_found() {
        assert_splat("partial output[    9.500000] BUG: KASAN: use-after-free in foo");
    }

    #[test]
    fn ordinary_boot_lines_are_not_splats() {
        for line in [
            "[    0.000000] Linux version 6.12.57 (root@host) (clang version 19) #1 SMP",
            "[    0.000000] kasan: KernelAddressSanitizer initialized",
            "[    0.120000] Lock dependency validator: Copyright (c) 2006 Red Hat, Inc., Ingo Molnar",
            "[    0.120000] ... MAX_LOCKDEP_SUBCLASSES:  8",
            "[    0.300000] rcu: Hierarchical RCU implementation.",
            "[    0.400000] Run /work/main/qemu/guest-init.sh as init process",
            "[    1.000000] virtio_blk virtio1: [vda] 262144 512-byte logical blocks",
            "[    1.200000] SANBLK-GUEST-START: /run/sanblk-out/script.sh",
            "[    2.000000] SANBLK-GUEST-EXIT: 0",
            "[    2.000010] sysrq: Resetting",
            "[    2.000010] reboot: Restarting system",
        ] {
            assert_no_splat(line);
        }
    }

    #[test]
    fn caller_id_field_is_skipped() {
        assert_splat("[    5.123456][    T1] WARNING: CPU: 0 PID: 1 at x");
        assert_splat("[    5.123456][     C0] BUG: KASAN: use-after-free in y");
        assert_eq!(kernel_message("[    1.000000][  T42] hello"), Some("hello"));
        assert_eq!(
            kernel_message("[    1.000000][vda] hello"),
            Some("[vda] hello")
        );
    }

    #[test]
    fn program_output_without_timestamp_is_not_a_splat() {
        assert_no_splat("WARNING: this is printed by mkfs, not the kernel");
        assert_no_splat("BUG: a test script talking about a bug");
        assert_no_splat("[vda] WARNING: brackets without a timestamp");
    }

    #[test]
    fn splats_are_returned_in_order_from_a_multi_line_log() {
        let log = "\
[    0.000000] kasan: KernelAddressSanitizer initialized
[    1.000000] sanblk: loaded
[    2.000000] ==================================================================
[    2.000001] BUG: KASAN: slab-out-of-bounds in sanblk_rq+0x1/0x2
[    2.000002] Read of size 8 at addr ffff888004a0 by task fio/55
[    2.000003] Call Trace:
[    2.000004]  <TASK>
";
        assert_eq!(
            find_splats(log),
            vec![
                "[    2.000001] BUG: KASAN: slab-out-of-bounds in sanblk_rq+0x1/0x2",
                "[    2.000003] Call Trace:",
            ]
        );
    }

    #[test]
    fn timestamps_are_detected() {
        assert!(has_kernel_timestamps(
            "foo\n[    0.000000] Linux version 6.12\n"
        ));
        assert!(!has_kernel_timestamps("foo\nbar [x.y] baz\n"));
        assert_eq!(kernel_message("[  123.456789] hello"), Some("hello"));
        assert_eq!(kernel_message("[ 12.3x] hello"), None);
    }
}

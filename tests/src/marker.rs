//! The lines `qemu/guest-init.sh` prints to the kernel log around the test script.

/// Printed (via /dev/kmsg) just before the test script starts; its timestamp is the boot time.
pub const START_MARKER: &str = "SANBLK-GUEST-START: ";
/// Printed (via /dev/kmsg) with the script's exit code just before the guest reboots.
pub const EXIT_MARKER: &str = "SANBLK-GUEST-EXIT: ";

/// The exit code reported by the last complete `SANBLK-GUEST-EXIT: <rc>` line, if any.
///
/// Only newline-terminated lines count: a line cut short by the reboot (e.g. "...EXIT: 1" of
/// "...EXIT: 12") must not be mistaken for a different exit code.
pub fn parse_exit_code(log: &str) -> Option<i32> {
    complete_lines(log)
        .filter_map(|line| {
            let (_, rest) = line.split_once(EXIT_MARKER)?;
            rest.trim().parse::<i32>().ok()
        })
        .last()
}

/// Guest uptime in seconds when the test script started (kernel timestamp of the start line).
pub fn script_start_uptime(log: &str) -> Option<f64> {
    complete_lines(log)
        .filter(|line| line.contains(START_MARKER))
        .find_map(|line| {
            let open = line.find('[')?;
            let close = open + line[open..].find(']')?;
            line[open + 1..close].trim().parse::<f64>().ok()
        })
}

fn complete_lines(log: &str) -> impl Iterator<Item = &str> {
    // Whatever follows the last '\n' is an unterminated (possibly cut short) line: drop it.
    let complete = match log.rfind('\n') {
        Some(end) => &log[..end],
        None => "",
    };
    complete.split('\n').map(|line| line.trim_end_matches('\r'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_is_parsed_from_kernel_line() {
        let log = "[    1.0] SANBLK-GUEST-START: /run/sanblk-out/script.sh\r\n\
                   hello from the script\r\n\
                   [    2.5] SANBLK-GUEST-EXIT: 7\r\n\
                   [    2.6] sysrq: Resetting\r\n";
        assert_eq!(parse_exit_code(log), Some(7));
        assert_eq!(script_start_uptime(log), Some(1.0));
    }

    #[test]
    fn missing_marker_is_none() {
        assert_eq!(
            parse_exit_code("[    1.0] Kernel panic - not syncing\n"),
            None
        );
        assert_eq!(parse_exit_code(""), None);
        assert_eq!(script_start_uptime("nothing\n"), None);
    }

    #[test]
    fn truncated_last_line_is_ignored() {
        assert_eq!(parse_exit_code("[    2.5] SANBLK-GUEST-EXIT: 1"), None);
        assert_eq!(parse_exit_code("a\n[    2.5] SANBLK-GUEST-EXIT: 12"), None);
    }

    #[test]
    fn garbage_after_marker_is_ignored_and_last_marker_wins() {
        let log = "[ 1.0] SANBLK-GUEST-EXIT: x\n[ 2.0] SANBLK-GUEST-EXIT: 0\n\
                   [ 3.0] SANBLK-GUEST-EXIT: 126\n";
        assert_eq!(parse_exit_code(log), Some(126));
        assert_eq!(parse_exit_code("[ 1.0] SANBLK-GUEST-EXIT: x\n"), None);
    }

    #[test]
    fn negative_and_large_codes_parse() {
        assert_eq!(parse_exit_code("SANBLK-GUEST-EXIT: 255\n"), Some(255));
        assert_eq!(parse_exit_code("SANBLK-GUEST-EXIT: -1\n"), Some(-1));
    }
}

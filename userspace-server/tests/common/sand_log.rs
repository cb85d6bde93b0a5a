//! Reading sand's log in tests. One copy for both test harnesses: the end-to-end tests crate
//! includes this file too (`tests/src/server.rs`).

/// What sand logs when it resumes a recovery (followed by the device, "at byte", the cursor);
/// sand's `recovery::resume_all` writes it.
const RESUMING: &str = "resuming recovery off device ";

/// The cursor of the last resumed recovery in a server log.
pub fn last_resume_cursor(log: &str) -> Option<u64> {
    log.lines()
        .filter_map(|l| l.split(RESUMING).nth(1))
        .filter_map(|rest| rest.split(" at byte ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|n| n.parse::<u64>().ok())
        .next_back()
}

//! Reading what the guest probe (`sanblk-nlprobe`) prints for hostile requests: one line
//! per case, `case=<name> errno=<n> msg=<extack message>` (or `case=<name> accepted`).

use std::collections::HashMap;

/// The cases of a probe's output: name to the rest of its line.
pub fn cases(output: &str) -> HashMap<String, String> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("case="))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, rest)| (name.to_string(), rest.to_string()))
        .collect()
}

/// The errno a case was refused with; panics (naming the case and the whole output) if it
/// is missing, was accepted or shows no errno.
pub fn errno_of(cases: &HashMap<String, String>, case: &str, output: &str) -> i32 {
    let rest = cases
        .get(case)
        .unwrap_or_else(|| panic!("case {case} missing in {output}"));
    assert!(
        !rest.starts_with("accepted"),
        "{case} was accepted: {output}"
    );
    rest.strip_prefix("errno=")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no errno for {case}: {rest}"))
}

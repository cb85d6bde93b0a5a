//! End-to-end tests of the sanblk module skeleton: load, STATUS over generic netlink from a
//! Rust guest program (neli), hostile netlink messages, unload. Real kernel, real module.

use std::collections::HashMap;

use sanblk_tests::{module_path, probe, run, target_bin, VmConfig};

fn key_values(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn probe() -> String {
    target_bin("sanblk-nlprobe").display().to_string()
}

#[test]
fn module_loads_answers_status_and_unloads() {
    let script = format!(
        r#"set -e
insmod {module}
grep -w sanblk /proc/devices > devices.txt
{probe} status > status.txt
rmmod sanblk
if grep -qw sanblk /proc/devices; then echo "major still registered" >&2; exit 3; fi
if {probe} status 2> after.txt; then echo "family still answers" >&2; exit 4; fi
"#,
        module = module_path().display(),
        probe = probe()
    );
    let outcome = run(&VmConfig::new("module-load", &script)).expect("guest ran");
    outcome.assert_clean_success();

    let status = key_values(&outcome.read_out_file("status.txt").expect("status.txt"));
    assert_eq!(
        status.get("protocol_version"),
        Some(&sanblk_uapi::netlink::PROTOCOL_VERSION.to_string())
    );
    assert_eq!(
        status.get("module_version").map(String::as_str),
        Some("0.1.0")
    );
    assert_eq!(status.get("volume_count").map(String::as_str), Some("0"));
    let major = outcome.read_out_file("devices.txt").expect("devices.txt");
    let major_number = major
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        !major_number.is_empty(),
        "no sanblk line in /proc/devices: {major:?}"
    );
    assert_eq!(
        status.get("block_major"),
        Some(&major_number),
        "STATUS major != /proc/devices"
    );
    let after = outcome.read_out_file("after.txt").expect("after.txt");
    assert!(
        after.contains("not found"),
        "unexpected probe error after unload: {after}"
    );
    assert!(outcome.serial_log.contains("sanblk: loaded, block major"));
    assert!(outcome.serial_log.contains("sanblk: unloading"));
}

#[test]
fn hostile_netlink_messages_get_errors_and_change_nothing() {
    let script = format!(
        r#"set -e
insmod {module}
{probe} status > before.txt
{probe} hostile > hostile.txt
{probe} status > after.txt
# A process without CAP_NET_ADMIN may read status but not send CREATE.
setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all \
    {probe} status > unprivileged-status.txt
setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all \
    {probe} hostile > unprivileged-hostile.txt || true
# Joining the events group needs CAP_NET_ADMIN too: refused at once (the timeout only ends
# a probe that joined and waits for an event). Root joins and waits: stopped once it says
# it is listening. No short timeouts: a probe can take seconds to start in a loaded guest.
setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all \
    timeout 60 {probe} events 1 > unprivileged-events.txt 2>&1 || true
{probe} events 1 > privileged-events.txt 2>&1 &
listener=$!
for i in $(seq 1 600); do
    if grep -q listening privileged-events.txt; then break; fi
    sleep 0.1
done
kill $listener 2>/dev/null || true
wait $listener 2>/dev/null || true
rmmod sanblk
"#,
        module = module_path().display(),
        probe = probe()
    );
    let outcome = run(&VmConfig::new("module-hostile", &script)).expect("guest ran");
    outcome.assert_clean_success();

    let hostile = outcome.read_out_file("hostile.txt").expect("hostile.txt");
    let cases = probe::cases(&hostile);
    let errno_of = |case: &str| probe::errno_of(&cases, case, &hostile);
    const EINVAL: i32 = 22;
    const ERANGE: i32 = 34;
    const EOPNOTSUPP: i32 = 95;
    assert_eq!(errno_of("unknown-command"), EOPNOTSUPP);
    assert_eq!(errno_of("zero-command"), EOPNOTSUPP);
    assert_eq!(errno_of("event-from-userspace"), EOPNOTSUPP);
    assert_eq!(errno_of("create-missing-attributes"), EINVAL);
    assert!(cases["create-missing-attributes"].contains("CREATE needs attribute VOLUME_ID"));
    assert!(matches!(errno_of("create-oversized-name"), EINVAL | ERANGE));
    assert_eq!(errno_of("create-mistyped-volume-id"), EINVAL);
    assert_eq!(errno_of("create-unterminated-name"), EINVAL);
    assert!(matches!(errno_of("create-oversized-map"), EINVAL | ERANGE));
    assert_eq!(errno_of("status-unknown-attribute"), EINVAL);
    assert_eq!(errno_of("status-pad-attribute"), EINVAL);
    assert_eq!(errno_of("destroy-missing-volume"), EINVAL);
    assert_eq!(errno_of("set-state-missing-attributes"), EINVAL);
    assert!(cases["set-state-missing-attributes"]
        .contains("SET_DEVICE_STATE needs attribute VOLUME_ID"));
    const ENOENT: i32 = 2;
    assert_eq!(errno_of("set-state-no-such-volume"), ENOENT);
    assert!(hostile.contains("case=truncated-message"), "{hostile}");

    // Nothing changed: the module answers STATUS identically afterwards.
    let before = outcome.read_out_file("before.txt").expect("before.txt");
    let after = outcome.read_out_file("after.txt").expect("after.txt");
    assert_eq!(before, after);
    assert_eq!(
        outcome
            .read_out_file("unprivileged-status.txt")
            .expect("unprivileged status"),
        before
    );
    let unprivileged = outcome
        .read_out_file("unprivileged-hostile.txt")
        .expect("unpriv hostile");
    const EPERM: i32 = 1;
    assert!(
        unprivileged.contains(&format!("case=create-missing-attributes errno={EPERM} ")),
        "unprivileged CREATE not refused with EPERM: {unprivileged}"
    );
    let unprivileged_events = outcome
        .read_out_file("unprivileged-events.txt")
        .expect("unprivileged events");
    assert!(
        unprivileged_events.contains("cannot join the events group")
            && !unprivileged_events.contains("listening"),
        "an unprivileged process joined the events group: {unprivileged_events}"
    );
    let privileged_events = outcome
        .read_out_file("privileged-events.txt")
        .expect("privileged events");
    assert!(
        privileged_events.contains("listening"),
        "root could not join the events group: {privileged_events}"
    );
}

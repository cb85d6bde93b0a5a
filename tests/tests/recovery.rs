//! End-to-end recovery: a real `sand` with two SAN disks, a guest whose first SAN device is a
//! dm device over the virtio disk so the test can fail it from inside (dm-error). After the
//! failure, writes are redirected to the server; the module multicasts the path failure, the
//! agent reports it, the server copies the volume onto the second disk (keeping redirected
//! writes consistent), publishes a new epoch, and the kernel resumes direct I/O on the new
//! disk. The host then finds every block where the final map says, on the new disk.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use sanblk_tests::blocks::BLOCK;
use sanblk_tests::{
    blocks, module_path, run, scratch_dir, sparse_image, target_bin, SandServer, VmConfig,
};
use sand::protocol::{DeviceInfo, VolumeDetail};

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 16 * MIB;

#[test]
fn failed_device_is_recovered_onto_a_new_disk_and_direct_io_resumes() {
    let dir = scratch_dir("recovery-e2e").expect("scratch");
    let server = SandServer::start(&dir).expect("sand");
    let images: Vec<PathBuf> = (0..2)
        .map(|i| {
            let path = dir.join(format!("san{i}.img"));
            sparse_image(&path, 64 * MIB).expect("image");
            path
        })
        .collect();
    // The volume lands on san0 (the only device when it is created); san1 is the spare.
    server.sanctl(&["pool", "add", &images[0].display().to_string()]);
    server.sanctl(&["volume", "create", "vrec", "16M"]);
    server.sanctl(&["pool", "add", &images[1].display().to_string()]);
    let secret = dir.join("host1.secret");
    server.sanctl(&[
        "client",
        "add",
        "host1",
        "--secret-out",
        &secret.display().to_string(),
    ]);
    server.sanctl(&["client", "grant", "host1", "vrec", "rw"]);
    let pool: Vec<DeviceInfo> =
        serde_json::from_str(&server.sanctl(&["--json", "pool", "list"])).expect("pool json");
    let by_uuid: HashMap<uuid::Uuid, PathBuf> = pool
        .iter()
        .map(|d| (d.uuid, PathBuf::from(&d.path)))
        .collect();
    let spare = pool
        .iter()
        .find(|d| d.path == images[1].display().to_string())
        .expect("san1 in pool")
        .uuid;

    // Written direct before the failure, then through the server, then direct on the new disk.
    let before = blocks::pattern("recovery", 1, VOLUME);
    let after = blocks::pattern("recovery", 2, VOLUME);
    let last = blocks::pattern("recovery", 3, VOLUME / 2);
    let mut expected = last.clone();
    expected.extend_from_slice(&after[(VOLUME / 2) as usize..]);
    fs::write(dir.join("before.pattern"), &before).expect("pattern");
    fs::write(dir.join("after.pattern"), &after).expect("pattern");
    fs::write(dir.join("last.pattern"), &last).expect("pattern");
    fs::write(dir.join("expected.pattern"), &expected).expect("pattern");

    let port = server.port;
    let io_port = server.io_port().expect("io port");
    let script = format!(
        r#"set -ex
insmod {module}
S={sanctl}
D={dir}
wait_for() {{ for i in $(seq 1 300); do [ -e "$1" ] && return 0; sleep 0.2; done; return 1; }}
SECTORS=$(blockdev --getsz /dev/vda)
dmsetup create san0 --table "0 $SECTORS linear /dev/vda 0"
$S attach vrec --server 10.0.2.100:{port} --client host1 --secret-file $D/host1.secret \
    --device /dev/mapper/san0 --device /dev/vdb --io-server 10.0.2.100:{io_port} > agent.log 2>&1 &
wait_for /run/sanblk/vrec.device
dev=$(cat /run/sanblk/vrec.device)
dd if=$D/before.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
dmsetup reload san0 --table "0 $SECTORS error"
dmsetup resume san0
dd if=$D/after.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
# Recovery ends with a new epoch whose only device is the spare.
for i in $(seq 1 600); do
    $S --json status > recovered.json
    if grep -q '"/dev/vdb"' recovered.json && ! grep -q 'mapper/san0' recovered.json; then break; fi
    sleep 0.5
done
dd if=$D/last.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
$S --json status > final.json
$S status > status.txt
dd if=$dev of=/tmp/back bs=1M iflag=direct status=none
cmp /tmp/back $D/expected.pattern
$S detach vrec
rmmod sanblk
dmsetup remove san0
"#,
        module = module_path().display(),
        sanctl = target_bin("sanctl").display(),
        dir = dir.display(),
    );
    let config = VmConfig::new("recovery-e2e", &script)
        .disk(&images[0])
        .disk(&images[1])
        .forward_port(port)
        .forward_port(io_port)
        .timeout(Duration::from_secs(500));
    let outcome = run(&config).expect("guest ran");
    outcome.assert_clean_success();

    let recovered: serde_json::Value =
        serde_json::from_str(&outcome.read_out_file("recovered.json").expect("json"))
            .expect("json");
    let final_status: serde_json::Value =
        serde_json::from_str(&outcome.read_out_file("final.json").expect("json")).expect("json");
    let volume = &recovered["volumes"][0];
    assert_eq!(
        volume["devices"][0]["path"], "/dev/vdb",
        "not recovered: {volume}"
    );
    assert!(volume["epoch"].as_u64().unwrap_or(0) >= 2, "{volume}");
    // Direct I/O resumed: the last write was not redirected.
    assert_eq!(
        volume["redirected_ios"], final_status["volumes"][0]["redirected_ios"],
        "writes after recovery still went to the server"
    );
    let status = outcome.read_out_file("status.txt").expect("status");
    assert!(
        status.contains("recovery of vrec"),
        "no recovery progress shown: {status}"
    );

    let detail: VolumeDetail =
        serde_json::from_str(&server.sanctl(&["--json", "volume", "show", "vrec"])).expect("json");
    let mut checked = 0;
    for extent in &detail.map.extents {
        for replica in &extent.replicas {
            assert_eq!(
                replica.device_uuid, spare,
                "extent still on the failed disk: {extent:?}"
            );
            let mut offset = 0;
            while offset < extent.length {
                let at = (extent.volume_offset + offset) as usize;
                let got = blocks::read_at(
                    &by_uuid[&replica.device_uuid],
                    replica.device_offset + offset,
                    BLOCK,
                )
                .expect("read image");
                assert!(
                    got == expected[at..at + BLOCK as usize],
                    "volume offset {at} wrong on the new disk"
                );
                offset += BLOCK;
                checked += 1;
            }
        }
    }
    assert_eq!(checked as u64, VOLUME / BLOCK);
}

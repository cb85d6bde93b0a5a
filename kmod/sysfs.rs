// SPDX-License-Identifier: GPL-2.0

//! `/sys/block/sanblkN/sanblk/{volume_name,volume_id,epoch}`: find a volume's block device by
//! name (udev rules or scripts can link /dev/disk/by-sanblk/NAME from these).

use core::fmt::Write;
use core::ptr::null_mut;

use crate::ffi::sysfs::{
    Attribute, AttributeGroup, AttributeGroups, AttributeList, Show, ShowBuffer,
};
use crate::remap::SanblkDisk;
use crate::volume::Volume;

struct Name;
impl Show<SanblkDisk> for Name {
    fn show(volume: &Volume, out: &mut ShowBuffer) {
        out.write(volume.name.as_bytes());
    }
}

struct Id;
impl Show<SanblkDisk> for Id {
    fn show(volume: &Volume, out: &mut ShowBuffer) {
        let _ = write!(out, "{}", volume.id);
    }
}

struct Epoch;
impl Show<SanblkDisk> for Epoch {
    fn show(volume: &Volume, out: &mut ShowBuffer) {
        let _ = write!(out, "{}", volume.current_map().epoch);
    }
}

static NAME: Attribute<SanblkDisk, Name> = Attribute::new(c"volume_name");
static ID: Attribute<SanblkDisk, Id> = Attribute::new(c"volume_id");
static EPOCH: Attribute<SanblkDisk, Epoch> = Attribute::new(c"epoch");
static ATTRS: AttributeList<4> =
    AttributeList::new([NAME.as_ptr(), ID.as_ptr(), EPOCH.as_ptr(), null_mut()]);
static GROUP: AttributeGroup = AttributeGroup::new(c"sanblk", &ATTRS);

/// The attribute groups of every sanblk disk.
pub(crate) static GROUPS: AttributeGroups = AttributeGroups::one(&GROUP);

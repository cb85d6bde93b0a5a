//! Wire formats shared by the sanblk kernel module and userspace.
//!
//! `#![no_std]`, no dependencies and no allocation, so the kernel module compiles these very
//! source files (`#[path]`) and there is exactly one definition of every format.

#![no_std]
#![forbid(unsafe_code)]

pub mod cow;
pub mod frame;
pub mod map;
pub mod netlink;
pub mod pipeline;

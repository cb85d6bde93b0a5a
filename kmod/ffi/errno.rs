// SPDX-License-Identifier: GPL-2.0

//! Error codes the 6.12 `kernel::error::code` module does not declare.

use kernel::bindings;
use kernel::error::Error;

fn from_bindings(code: u32) -> Error {
    // Kernel errno constants are small positive numbers; `from_errno` wants them negated.
    Error::from_errno(-(code as i32))
}

pub(crate) fn eopnotsupp() -> Error {
    from_bindings(bindings::EOPNOTSUPP)
}

pub(crate) fn emsgsize() -> Error {
    from_bindings(bindings::EMSGSIZE)
}

pub(crate) fn estale() -> Error {
    from_bindings(bindings::ESTALE)
}

pub(crate) fn etimedout() -> Error {
    from_bindings(bindings::ETIMEDOUT)
}

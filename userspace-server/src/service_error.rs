//! The services' answer when a request fails: the wire error (`ErrorBody`, a code and a
//! message), and how the store's errors map onto it. The store and allocator speak their own
//! error types; this is the one place that knows both them and the wire.

use sanblk_proto::protocol::{ErrorBody, ErrorCode};

use crate::allocator::AllocError;
use crate::store::StoreError;

/// The outcome of a service step, failing with what the client is told.
pub type ServiceResult<T> = Result<T, ErrorBody>;

impl From<StoreError> for ErrorBody {
    fn from(error: StoreError) -> ErrorBody {
        let code = match &error {
            StoreError::Database(_) => ErrorCode::Internal,
            StoreError::NotFound(_) => ErrorCode::NotFound,
            StoreError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            StoreError::Invalid(_) => ErrorCode::BadRequest,
            StoreError::Busy(_) => ErrorCode::Busy,
            StoreError::Alloc(AllocError::NoSpace { .. })
            | StoreError::Alloc(AllocError::NotEnoughDevices { .. }) => ErrorCode::NoSpace,
            StoreError::Alloc(AllocError::BadSize(_))
            | StoreError::Alloc(AllocError::TooManyExtents { .. }) => ErrorCode::BadRequest,
            StoreError::Alloc(AllocError::Corrupt(_)) => ErrorCode::Internal,
        };
        ErrorBody::new(code, error.to_string())
    }
}

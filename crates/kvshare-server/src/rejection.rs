//! Why a request or a block was refused, and how that maps to gRPC status codes.

use kvshare_core::CoreError;
use tonic::{Code, Status};

/// A refusal: the gRPC status code a client sees and a message saying what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The status code.
    pub code: Code,
    /// What was wrong, for a person.
    pub message: String,
}

impl Rejection {
    /// A refusal with `code`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
        }
    }

    /// `INVALID_ARGUMENT`: the request itself is malformed.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// `RESOURCE_EXHAUSTED`: too large for a limit of this node, or no room right now.
    pub fn exhausted(message: impl Into<String>) -> Self {
        Self::new(Code::ResourceExhausted, message)
    }

    /// The same refusal with `context` (e.g. which block) in front of its message.
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        Rejection {
            code: self.code,
            message: format!("{context}: {}", self.message),
        }
    }

    /// The refusal as a gRPC status.
    pub fn into_status(self) -> Status {
        Status::new(self.code, self.message)
    }
}

impl From<&CoreError> for Rejection {
    fn from(e: &CoreError) -> Self {
        let code = match e {
            CoreError::TooLarge { .. } | CoreError::OverQuota { .. } => Code::ResourceExhausted,
            _ => Code::InvalidArgument,
        };
        Rejection::new(code, e.to_string())
    }
}

impl From<&Status> for Rejection {
    fn from(s: &Status) -> Self {
        Rejection::new(s.code(), s.message())
    }
}

impl From<Rejection> for Status {
    fn from(r: Rejection) -> Self {
        r.into_status()
    }
}

/// True for codes that mean "the peer did not answer" (as opposed to "the peer refused").
pub fn is_unreachable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_errors_map_to_codes() {
        let too_large = CoreError::TooLarge { size: 10, limit: 5 };
        assert_eq!(Rejection::from(&too_large).code, Code::ResourceExhausted);
        let bad = CoreError::Corrupt("x".into());
        let r = Rejection::from(&bad).context("block 3");
        assert_eq!(r.code, Code::InvalidArgument);
        assert!(r.message.starts_with("block 3: "));
        assert_eq!(Status::from(r).code(), Code::InvalidArgument);
    }

    #[test]
    fn unreachable_codes() {
        assert!(is_unreachable(Code::Unavailable));
        assert!(is_unreachable(Code::DeadlineExceeded));
        assert!(!is_unreachable(Code::InvalidArgument));
    }
}

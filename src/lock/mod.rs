//! Distributed locks with fencing tokens.

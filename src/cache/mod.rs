//! Response caching: RFC 9111 shared-cache rules, keys and stores (the layer comes next).

pub(crate) mod key;
pub(crate) mod policy;
pub(crate) mod store;

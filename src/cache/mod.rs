//! Response caching: RFC 9111 shared-cache rules (the layer and stores come next).

pub(crate) mod policy;

//! Cluster mode (SPEC §8), the building blocks so far: an etcd v3 client over the JSON
//! gateway (`etcd`) and the sealed shared record with the keyed account identity
//! (`record`). Leader election and the engine's use of them come next.

pub mod etcd;
pub mod member;
pub mod record;

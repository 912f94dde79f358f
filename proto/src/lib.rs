//! Generated gRPC code for sagad's two protocols: `sagad.v1` (clients to the orchestrator) and
//! `sagad.participant.v1` (the orchestrator to participant services); and `sagad.demo.v1`, the
//! read services of the demo participants.

pub mod codec;

/// The orchestrator's client API.
pub mod v1 {
    tonic::include_proto!("sagad.v1");
}

/// The protocol every participant serves.
pub mod participant {
    /// Version 1 of the participant protocol.
    pub mod v1 {
        tonic::include_proto!("sagad.participant.v1");
    }
}

/// The read services of the demo participants (order, payment, shipping).
pub mod demo {
    /// Version 1 of the demo read services.
    pub mod v1 {
        tonic::include_proto!("sagad.demo.v1");
    }
}

/// The encoded descriptors of every proto above, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sagad_descriptor.bin"));

//! Generated gRPC code for sagad's two protocols: `sagad.v1` (clients to the orchestrator) and
//! `sagad.participant.v1` (the orchestrator to participant services).

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

/// The encoded descriptors of every proto above, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sagad_descriptor.bin"));

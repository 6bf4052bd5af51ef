//! Debug for the messages that carry secrets, without them: a join reply printed (a log
//! line, a test's failure) shows the generation and its group, never the ring key or the
//! NCCL id.

use crate::v1::JoinReply;

impl std::fmt::Debug for JoinReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinReply")
            .field("generation", &self.generation)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("peers", &self.peers)
            .field("data", &self.data)
            .field("out", &self.out)
            .field("checkpoint", &self.checkpoint)
            .field("backend", &self.backend)
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("collective_timeout_ms", &self.collective_timeout_ms)
            .field("run_id", &self.run_id)
            .field("restart", &self.restart)
            .field("nccl_id", &format_args!("({} bytes)", self.nccl_id.len()))
            .field("ring_key", &format_args!("({} bytes)", self.ring_key.len()))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_reply_printed_shows_no_secret() {
        let r = JoinReply {
            generation: 3,
            ring_key: vec![0xA7; 32],
            nccl_id: vec![0xB8; 128],
            ..Default::default()
        };
        let shown = format!("{r:?}");
        assert!(
            shown.contains("generation: 3") && shown.contains("(32 bytes)"),
            "{shown}"
        );
        assert!(!shown.contains("167") && !shown.contains("184"), "{shown}");
    }
}

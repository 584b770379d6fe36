//! What the Kafka parsers of every connection share: a client learns topic ids on one
//! connection (Metadata) and uses them on another (Fetch v13+), and names its consumer group on
//! the group coordinator's connection, not on the ones it fetches from.

use std::cell::{Ref, RefCell};

use compact_str::CompactString;
use rustc_hash::FxHashMap;

use super::TopicNames;

/// Shared by the parsers of one pipeline (one thread).
#[derive(Debug, Default)]
pub struct KafkaShared {
    /// Topic ids are random UUIDs, unique across clusters: one map serves every cluster the
    /// host's processes talk to.
    topic_names: RefCell<TopicNames>,
    /// The consumer group each process named last.
    groups: RefCell<FxHashMap<u32, CompactString>>,
}

impl KafkaShared {
    /// Processes with a group kept, at most (past it a new one is not kept).
    pub const MAX_GROUPS: usize = 4096;

    pub fn topic_names(&self) -> Ref<'_, TopicNames> {
        self.topic_names.borrow()
    }

    pub(super) fn topic_names_mut(&self) -> std::cell::RefMut<'_, TopicNames> {
        self.topic_names.borrow_mut()
    }

    pub fn group(&self, pid: u32) -> Option<CompactString> {
        self.groups.borrow().get(&pid).cloned()
    }

    pub(super) fn set_group(&self, pid: u32, group: &CompactString) {
        let mut groups = self.groups.borrow_mut();
        if let Some(known) = groups.get_mut(&pid) {
            if known != group {
                known.clone_from(group);
            }
        } else if groups.len() < Self::MAX_GROUPS {
            groups.insert(pid, group.clone());
        }
    }

    /// The process exited: its pid may come back as another process.
    pub fn forget_process(&self, pid: u32) {
        self.groups.borrow_mut().remove(&pid);
    }
}

//! `servers/fork_children.py`: a traced parent whose children come and go, for the tests of the
//! kernel maps' and the agent's state over processes (see the script's doc).

use std::io::Write;
use std::process::{Child, ChildStdin};

use crate::{LinePump, helper_timeout, kill_and_reap, spawn_python_script};

/// The parent, started and waiting for [`ProcessTree::fork`]. On drop, children still alive are
/// killed and the parent is stopped.
pub struct ProcessTree {
    child: Child,
    /// The parent's pid (select it with `--pid`: its children are traced through inheritance).
    pub pid: u32,
    stdin: Option<ChildStdin>,
    stdout: LinePump,
    stderr: LinePump,
    /// Pids of the children while they live.
    children: Vec<u32>,
    /// `kill` was said: the parent waits for `end`.
    killed: bool,
}

impl ProcessTree {
    /// Starts the parent; it forks nothing until [`ProcessTree::fork`].
    pub fn start(threads: usize, children: usize) -> ProcessTree {
        let (threads, children) = (threads.to_string(), children.to_string());
        let (mut child, stdout, stderr) =
            spawn_python_script("fork_children.py", &[&threads, &children]);
        let pid = child.id();
        let stdin = child.stdin.take();
        ProcessTree {
            child,
            pid,
            stdin,
            stdout,
            stderr,
            children: Vec::new(),
            killed: false,
        }
    }

    /// Starts the threads and forks the children (each connects to the parent and sleeps);
    /// returns their pids once all are forked (they may still be connecting).
    pub fn fork(&mut self) -> Vec<u32> {
        self.say("go");
        self.children = self
            .expect_line("children")
            .split_whitespace()
            .map(|pid| pid.parse().expect("child pid"))
            .collect();
        self.children.clone()
    }

    /// Kills the children with SIGKILL and waits until the parent has reaped them all.
    pub fn kill_children(&mut self) {
        self.say("kill");
        self.expect_line("killed");
        self.children.clear();
        self.killed = true;
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .expect("write to fork_children.py");
    }

    /// The rest of the next stdout line, which must start with `word`.
    fn expect_line(&mut self, word: &str) -> String {
        match self.stdout.lines.recv_timeout(helper_timeout()) {
            Ok(Some(line)) if line.split_whitespace().next() == Some(word) => {
                line[word.len()..].trim().to_string()
            }
            other => {
                self.kill_all();
                panic!(
                    "fork_children.py: expected `{word}...`, got {other:?}\n--- stderr ---\n{}",
                    self.stderr.finish()
                )
            }
        }
    }

    fn kill_all(&mut self) {
        for pid in self.children.drain(..) {
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        kill_and_reap(&mut self.child);
    }
}

impl Drop for ProcessTree {
    fn drop(&mut self) {
        if self.killed {
            // `end`: the parent ends its threads and exits by itself.
            if let Some(mut stdin) = self.stdin.take() {
                let _ = writeln!(stdin, "end");
            }
            if crate::wait_timeout(&mut self.child, helper_timeout()).is_some() {
                return;
            }
        }
        self.kill_all();
    }
}

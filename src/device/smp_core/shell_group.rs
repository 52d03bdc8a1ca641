//! The shell group (9) as Zephyr 4.4's shell_mgmt answers: `{"argv"}` →
//! the command's output `o` (as the dummy shell backend captures it,
//! `\r\n` first) and its return value `ret`. The shell knows Zephyr's
//! `kernel version`, `kernel uptime [-p]` and `kernel cycles`, plus the
//! commands the device was given (`SmpServerConfig::shell`).

use std::time::Duration;

use ciborium::Value;

use super::{Reply, SmpServer};
use crate::protocol::smp::{group, MgmtErr};

/// shell_mgmt's error numbers (shell_mgmt.h).
pub(super) mod shell_err {
    pub const COMMAND_TOO_LONG: u16 = 2;
    pub const EMPTY_COMMAND: u16 = 3;
}

/// CONFIG_SHELL_CMD_BUFF_SIZE: a command line must be shorter.
const CMD_BUFF_SIZE: usize = 256;
/// The Zephyr version `kernel version` reports (the one smp_svr was diffed against).
const ZEPHYR_VERSION: &str = "4.4.0";
const ENOEXEC: i64 = -8;
const EIO: i64 = -5;
/// How the shell colours an error.
const RED: &str = "\x1b[1;31m";
const PLAIN: &str = "\x1b[m";

const KERNEL_HELP: &str = "kernel - Kernel commands\r\nSubcommands:\r\n  cycles     : Kernel cycles.\r\n  uptime     : Kernel uptime. Can be called with the -p or --pretty options\r\n  version    : Kernel version.\r\n";

impl SmpServer {
    /// The words of `argv` up to its first non-text entry, joined as
    /// Zephyr composes the line, then run.
    pub(super) fn shell_exec(&mut self, m: &[(Value, Value)], now: Duration) -> Reply {
        let mut argv = None;
        for (k, v) in m {
            match k {
                Value::Text(t) if t == "argv" => {
                    argv = Some(v);
                    break;
                }
                Value::Text(_) => {}
                _ => return Reply::Rc(MgmtErr::Inval),
            }
        }
        let Some(Value::Array(argv)) = argv else { return Reply::Rc(MgmtErr::Inval) };
        let mut line = String::new();
        for word in argv {
            let Value::Text(w) = word else { break };
            if line.len() + w.len() >= CMD_BUFF_SIZE {
                return Reply::Group(group::SHELL, shell_err::COMMAND_TOO_LONG);
            }
            line.push_str(w);
            line.push(' ');
        }
        if line.is_empty() {
            return Reply::Group(group::SHELL, shell_err::EMPTY_COMMAND);
        }
        let (output, ret) = self.run_shell(&line, now);
        Reply::Body(vec![("o", Value::Text(format!("\r\n{output}"))), ("ret", Value::from(ret))])
    }

    fn run_shell(&self, line: &str, now: Duration) -> (String, i64) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some((_, out)) = self.config.shell.iter().find(|(cmd, _)| cmd.split_whitespace().eq(words.iter().copied())) {
            let mut text = out.trim_end_matches('\n').replace('\n', "\r\n");
            text.push_str("\r\n");
            return (text, 0);
        }
        let up = now.saturating_sub(self.booted_at);
        match words.as_slice() {
            [] => (String::new(), ENOEXEC),
            ["kernel", "version", ..] => (format!("Zephyr version {ZEPHYR_VERSION}\r\n"), 0),
            ["kernel", "uptime"] => (format!("Uptime: {} ms\r\n", up.as_millis()), 0),
            ["kernel", "uptime", "-p" | "--pretty"] => {
                let s = up.as_secs();
                let text = format!("uptime: {} days, {} hours, {} minutes, {} seconds, {} milliseconds\r\n", s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60, up.subsec_millis());
                (text, 0)
            }
            ["kernel", "uptime", option, ..] => (format!("{RED}Unsupported option: {option}\r\n{PLAIN}"), EIO),
            // native_sim counts hardware cycles at 1 MHz, in 32 bits.
            ["kernel", "cycles", ..] => (format!("cycles: {} hw cycles\r\n", up.as_micros() as u32), 0),
            ["kernel", ..] => (KERNEL_HELP.to_string(), 1),
            [command, ..] => (format!("{RED}{command}: command not found\r\n{PLAIN}"), ENOEXEC),
        }
    }
}

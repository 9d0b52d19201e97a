//! The REPL's core: [`Shell::execute`] runs one line against a node and returns what to print.
//!
//! Nothing here touches a terminal, so whole sessions are tested as data (see the snapshot
//! tests); `kvstore-cli` wraps it with line editing, history and stdin handling. Every line it
//! returns has its control characters escaped ([`escape_controls`]): keys and values are
//! anyone's bytes, and must not drive the terminal they are printed on.

use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;

use tonic::{Code, Status};

use crate::client::Client;
use crate::net::{failed_on_the_way, status_reason, timed_out};
use crate::pb::{Ack, Consistency, NodeStatus};

/// What the REPL prints for `help`.
pub const HELP: &str = "\
commands:
  put KEY VALUE   store VALUE under KEY (VALUE is the rest of the line, as typed)
  get KEY         print KEY's value, as this node has it
  get -q KEY      read KEY from a majority of nodes (newest wins, stale copies repaired)
  delete KEY      delete KEY
  list            print every pair, in key order
  status          this node's keys and log size, and each peer's state
  cluster         every node: its state, the partitions it holds, its keys, its address
  backup FILE     write every entry of this node, with its version, to FILE
  leave           this node hands its keys to the others and leaves the ring
  leave --force   the same, even if fewer nodes would stay than copies of each key
  remove NODE...  take each NODE (its address or node id), down for good, out of the ring
  help            show this help
  exit, quit      leave (Ctrl-D works too)";

/// What one line produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// Results, for standard output.
    pub stdout: Vec<String>,
    /// Problems (errors, warnings), for standard error.
    pub stderr: Vec<String>,
    /// The command failed (an error, not a warning).
    pub failed: bool,
    /// The user asked to leave.
    pub exit: bool,
}

impl Output {
    /// The same lines, with their control characters escaped.
    fn escaped(self) -> Self {
        let escape = |lines: Vec<String>| -> Vec<String> {
            lines
                .into_iter()
                .map(|line| match escape_controls(&line) {
                    Cow::Borrowed(_) => line,
                    Cow::Owned(escaped) => escaped,
                })
                .collect()
        };
        Self {
            stdout: escape(self.stdout),
            stderr: escape(self.stderr),
            ..self
        }
    }

    fn out(line: impl Into<String>) -> Self {
        Self {
            stdout: vec![line.into()],
            ..Self::default()
        }
    }

    fn error(message: impl std::fmt::Display) -> Self {
        Self {
            stderr: vec![format!("error: {message}")],
            failed: true,
            ..Self::default()
        }
    }
}

fn is_quorum_flag(word: &str) -> bool {
    matches!(word, "-q" | "--quorum")
}

/// `text` with every control character written as an escape: `\n`, `\r` and `\t` as such,
/// the others as `\u{1b}`. A value holding `ESC ]0;...` then cannot retitle or recolour the
/// user's terminal, and a key holding a newline cannot pass for lines of `list`. Other
/// characters, backslashes included, are shown as they are.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            c if c.is_control() => escaped.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => escaped.push(c),
        }
    }
    Cow::Owned(escaped)
}

/// `n` and its noun, `one` if `n` is 1 and `many` otherwise: "1 batch", "5 batches".
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Rows of cells as lines, each column padded to its widest cell.
fn align(rows: &[Vec<String>]) -> Vec<String> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            (rows.iter())
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    (rows.iter())
        .map(|row| {
            let cells: Vec<String> = (row.iter().zip(&widths))
                .map(|(cell, &width)| format!("{cell:width$}"))
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect()
}

/// The `status` command's lines.
fn render_status(status: &NodeStatus) -> Vec<String> {
    let mut lines = vec![format!(
        "node {}: {}, {}, log {}, data in {}",
        status.node_id,
        count(status.keys, "key", "keys"),
        count(status.tombstones, "tombstone", "tombstones"),
        count(status.log_bytes, "byte", "bytes"),
        status.data_dir
    )];
    // A ring: say what share of the keys the node holds. A node that predates rings reports
    // no partitions (0) and no ring state, and holds every key.
    let all = u32::from(kvstore_actors::ring::PARTITIONS);
    if status.partitions < all && (status.partitions != 0 || !status.ring_state.is_empty()) {
        lines.push(format!(
            "holds {} of {all} partitions ({} of each key)",
            status.partitions,
            count(u64::from(status.replicas), "copy", "copies")
        ));
    }
    // A ring that has changed, or is changing: its version, and this node's part.
    if status.ring_version > 1 || !matches!(status.ring_phase.as_str(), "" | "settled") {
        lines.push(format!(
            "ring version {} ({}), this node {}",
            status.ring_version, status.ring_phase, status.ring_state
        ));
    }
    if !status.ring_change.is_empty() {
        lines.push(format!("changing: {}", status.ring_change));
    }
    if !status.refusing_writes.is_empty() {
        lines.push(format!("refusing writes: {}", status.refusing_writes));
    }
    for peer in &status.peers {
        let mut line = format!("peer {}: {}", peer.address, peer.state);
        if peer.backlog > 0 {
            line.push_str(&format!(
                ", {} queued for handoff",
                count(peer.backlog, "write", "writes")
            ));
        }
        if peer.replicated_batches > 0 {
            line.push_str(&format!(
                ", {} replicated in {}",
                count(peer.replicated_writes, "write", "writes"),
                count(peer.replicated_batches, "batch", "batches")
            ));
        }
        if peer.resync_in_progress {
            line.push_str(", resync in progress");
        } else if peer.resync_pending {
            line.push_str(", resync pending");
        }
        match (peer.last_contact_ms, peer.refuses.as_str()) {
            (_, why) if !why.is_empty() => line.push_str(&format!(", refuses this node: {why}")),
            (Some(ms), _) => line.push_str(&format!(", last contact {ms}ms ago")),
            (None, _) => line.push_str(", never contacted"),
        }
        if let Some(ms) = peer.clock_offset_ms {
            let sign = if ms < 0 { "-" } else { "+" };
            let by = humantime::format_duration(Duration::from_millis(ms.unsigned_abs()));
            line.push_str(&format!(", clock {sign}{by}"));
            if ms.unsigned_abs() > status.max_clock_offset_ms {
                line.push_str(" (past the bound)");
            }
        }
        lines.push(line);
    }
    lines
}

/// Splits a REPL line into words: a command, then its arguments.
///
/// Words are separated by spaces and tabs. `'...'` quotes literally; `"..."` quotes too, with `\"` and
/// `\\` its only escapes. Nothing else is special: a backslash or a `#` inside a line is kept
/// as typed (a line that starts with `#` is a comment). A `put`'s value is the rest of the line
/// after the key, exactly as typed, so `put note call me #1 fan` and `put path C:\tmp` store
/// what they show; a value that starts with a quote must be one quoted string, and is
/// unquoted (`put k "  padded  "`). This is deliberately not a POSIX shell's grammar, whose
/// comments and escapes would silently change values.
pub fn split_line(line: &str) -> Result<Vec<String>, String> {
    let line = line.trim_matches(is_blank);
    if line.starts_with('#') {
        return Ok(Vec::new());
    }
    let mut words = Vec::new();
    let mut rest = line;
    while let Some((word, after)) = next_word(rest)? {
        words.push(word);
        rest = after;
        if words.len() == 2 && words[0] == "put" {
            let value = rest.trim_matches(is_blank);
            if !value.is_empty() {
                words.push(put_value(value)?);
            }
            break;
        }
    }
    Ok(words)
}

/// What separates words: spaces and tabs (and a line's own end). Other Unicode spaces (a
/// no-break space, an ideographic space) are part of a key or value, as they were typed.
fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// A `put`'s value from the rest of its line (trimmed, not empty).
fn put_value(rest: &str) -> Result<String, String> {
    let mut chars = rest.char_indices().peekable();
    let Some((_, quote)) = chars.next_if(|&(_, c)| c == '"' || c == '\'') else {
        return Ok(rest.to_string());
    };
    let mut value = String::new();
    read_quoted(&mut chars, quote, &mut value)?;
    if chars.next().is_some() {
        return Err(
            "a quoted value must be the whole value: quote all of it, or none of it".into(),
        );
    }
    Ok(value)
}

/// The first word of `s` and what follows it, or `None` if `s` is blank.
fn next_word(s: &str) -> Result<Option<(String, &str)>, String> {
    let s = s.trim_start_matches(is_blank);
    if s.is_empty() {
        return Ok(None);
    }
    let mut word = String::new();
    let mut chars = s.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if is_blank(c) {
            return Ok(Some((word, &s[at..])));
        }
        if c == '"' || c == '\'' {
            read_quoted(&mut chars, c, &mut word)?;
        } else {
            word.push(c);
        }
    }
    Ok(Some((word, "")))
}

/// Reads up to the closing `quote` (the opening one already read) into `out`. Inside `"`,
/// `\"` and `\\` stand for `"` and `\`; every other character, a backslash included, is itself.
fn read_quoted(
    chars: &mut std::iter::Peekable<std::str::CharIndices>,
    quote: char,
    out: &mut String,
) -> Result<(), String> {
    loop {
        match chars.next() {
            Some((_, c)) if c == quote => return Ok(()),
            Some((_, '\\')) if quote == '"' => {
                match chars.next_if(|&(_, c)| c == '"' || c == '\\') {
                    Some((_, escaped)) => out.push(escaped),
                    None => out.push('\\'),
                }
            }
            Some((_, c)) => out.push(c),
            None => return Err(format!("unclosed {quote} quote")),
        }
    }
}

/// A REPL session against one node.
pub struct Shell {
    client: Client,
}

impl Shell {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// Runs one line. Never fails: every problem becomes a line of `stderr`.
    pub async fn execute(&mut self, line: &str) -> Output {
        match split_line(line) {
            Ok(words) => self.execute_words(&words).await,
            Err(problem) => Output::error(problem).escaped(),
        }
    }

    /// Runs one command given as words already split (by the user's shell, for
    /// `kvstore-cli 5001 put k v`): a `put`'s words after the key are its value, joined by
    /// spaces. Nothing is unquoted again.
    pub async fn execute_words(&mut self, words: &[String]) -> Output {
        self.run(words).await.escaped()
    }

    async fn run(&mut self, words: &[String]) -> Output {
        let Some((command, args)) = words.split_first() else {
            return Output::default();
        };
        match (command.as_str(), args) {
            ("put", [key, value @ ..]) if !value.is_empty() => {
                let value = value.join(" ");
                self.write(self.client.put(key, &value).await)
            }
            ("get", [key]) if !is_quorum_flag(key) => match self.client.get(key).await {
                Ok(value) => Output::out(format!("{key} = {value}")),
                Err(status) => self.failure(&status, None),
            },
            ("get", [flag, key]) | ("get", [key, flag]) if is_quorum_flag(flag) => {
                match self.client.get_with(key, Consistency::Quorum).await {
                    Ok(value) => Output::out(format!("{key} = {}", value.value)),
                    Err(status) => self.failure(&status, None),
                }
            }
            ("status", []) => match self.client.status().await {
                Ok(status) => Output {
                    stdout: render_status(&status),
                    ..Output::default()
                },
                Err(status) => self.failure(&status, None),
            },
            ("cluster", []) => match self.client.status().await {
                Ok(status) => self.cluster(status).await,
                Err(status) => self.failure(&status, None),
            },
            ("delete" | "del", [key]) => self.write(self.client.delete(key).await),
            ("leave", []) => self.change(self.client.leave().await),
            ("leave", [force]) if force == "--force" => {
                self.change(self.client.leave_with(true).await)
            }
            ("remove", [node, also @ ..]) => {
                let also: Vec<&str> = also.iter().map(String::as_str).collect();
                self.change(self.client.remove_all(node, &also).await)
            }
            ("list", []) => match self.client.list().await {
                Ok(pairs) if pairs.is_empty() => Output::out("(no keys)"),
                Ok(pairs) => Output {
                    stdout: pairs.iter().map(|(k, v)| format!("{k} = {v}")).collect(),
                    ..Output::default()
                },
                Err(status) => self.failure(&status, None),
            },
            ("backup", [file]) => match crate::backup::write(&self.client, Path::new(file)).await {
                Ok(summary) => Output::out(format!(
                    "Backed up {} entries ({} tombstones, {} bytes) to {file}",
                    summary.entries, summary.tombstones, summary.bytes
                )),
                Err(crate::Error::Call(status)) => self.failure(&status, None),
                Err(error) => Output::error(error.to_string()),
            },
            ("help", _) => Output {
                stdout: HELP.lines().map(String::from).collect(),
                ..Output::default()
            },
            ("exit" | "quit", []) => Output {
                exit: true,
                ..Output::default()
            },
            ("put", _) => Output::error("usage: put KEY VALUE"),
            ("get", _) => Output::error("usage: get [-q|--quorum] KEY"),
            ("delete" | "del", _) => Output::error("usage: delete KEY"),
            ("backup", _) => Output::error("usage: backup FILE"),
            ("remove", _) => Output::error("usage: remove NODE [NODE...]"),
            ("leave", _) => Output::error("usage: leave [--force]"),
            ("list" | "status" | "cluster" | "exit" | "quit", _) => {
                Output::error(format!("usage: {command}"))
            }
            (other, _) => Output::error(format!("unknown command '{other}' (try 'help')")),
        }
    }

    /// The `cluster` table: this node and each of its peers, in address order. A peer's state
    /// is this node's view of it: `down` when its gossip sees it dead, or when it has no word
    /// of it by gossip and does not reach it; otherwise what the peer says (`normal`,
    /// `joining`...), or `unreachable` when the REPL does not reach it; its partitions and keys are what it reports itself, `-` when it does not answer.
    async fn cluster(&self, own: NodeStatus) -> Output {
        // A node says itself whether it is joining; the asked node says whether it is down.
        let own_state = |s: &NodeStatus| match s.ring_state.as_str() {
            "joining" => "joining",
            "leaving" => "leaving",
            "left" => "left",
            _ => "normal",
        };
        let mut rows = vec![(
            self.client.addr().to_string(),
            own_state(&own),
            Some(own.clone()),
        )];
        let asks = own.peers.iter().map(|peer| async move {
            let status = match self.client.to(&peer.address) {
                Ok(client) => client.status().await.ok(),
                Err(_) => None,
            };
            let state = match (peer.gossip.as_str(), peer.state.as_str(), &status) {
                // Gossip's failure detector has the last word where it has heard of the node.
                ("dead", _, _) => "down",
                (_, "up" | "lagging", Some(s)) | ("live", _, Some(s)) => own_state(s),
                // This node reaches it, the REPL does not: say so, rather than "normal".
                (_, "up" | "lagging", None) | ("live", _, None) => "unreachable",
                _ => "down",
            };
            (peer.address.clone(), state, status)
        });
        rows.extend(futures::future::join_all(asks).await);
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let all = u32::from(kvstore_actors::ring::PARTITIONS);
        let mut table = vec![vec![
            "address".to_string(),
            "state".into(),
            "partitions".into(),
            "keys".into(),
        ]];
        for (addr, state, status) in rows {
            let (partitions, keys) = match status {
                // A node that predates rings reports no partitions: it holds every key.
                Some(s) => (
                    match (s.partitions, s.ring_state.as_str()) {
                        (0, "") => all,
                        (partitions, _) => partitions,
                    }
                    .to_string(),
                    s.keys.to_string(),
                ),
                None => ("-".into(), "-".into()),
            };
            let this = if addr == self.client.addr() {
                " (this node)"
            } else {
                ""
            };
            table.push(vec![
                format!("{addr}{this}"),
                state.into(),
                partitions,
                keys,
            ]);
        }
        let mut stdout = align(&table);
        if !own.ring_change.is_empty() {
            stdout.push(format!("changing: {}", own.ring_change));
        }
        Output {
            stdout,
            ..Output::default()
        }
    }

    /// Output for a Put or Delete: the original system's message when every node has it, a warning naming
    /// the peers it missed when the quorum was still met, an error when it was not.
    fn write(&self, result: Result<Ack, Status>) -> Output {
        self.acked(result, "the write may or may not have been stored")
    }

    /// Output for a ring change (`leave`, `remove`), as for a write.
    fn change(&self, result: Result<Ack, Status>) -> Output {
        self.acked(
            result,
            "the ring change may or may not have begun (see cluster)",
        )
    }

    /// Output for a call answered by an Ack; `unsure` says what may have happened when the
    /// node did not answer.
    fn acked(&self, result: Result<Ack, Status>, unsure: &str) -> Output {
        match result {
            Ok(ack) if ack.ok && ack.failed_peers.is_empty() => Output::out(ack.message),
            Ok(ack) if ack.ok => Output {
                stderr: vec![format!("warning: {}", ack.message)],
                ..Output::default()
            },
            Ok(ack) => Output::error(ack.message),
            Err(status) => self.failure(&status, Some(unsure)),
        }
    }

    /// A hint for a connection that failed as one does when only one side talks TLS. A TLS
    /// client reads a node in the clear's HTTP/2 as a TLS record of no known type; a plaintext
    /// client's preface is answered with a TLS alert or a closed connection, which look like
    /// any broken connection, so that hint is only a maybe.
    fn tls_hint(&self, reason: &str) -> &'static str {
        let refused = reason == std::io::ErrorKind::ConnectionRefused.to_string();
        match self.client.tls() {
            true if reason.contains("InvalidContentType") => {
                "; the node does not seem to serve TLS: leave out --tls-ca"
            }
            false if !refused => "; if the node serves TLS, give its CA with --tls-ca",
            _ => "",
        }
    }

    /// Output for a failed call; `unsure`, for a call that changes something (a write, a ring
    /// change), says what may have happened all the same when the node did not answer.
    fn failure(&self, status: &Status, unsure: Option<&str>) -> Output {
        let addr = self.client.addr();
        Output::error(match status.code() {
            // The node may have stored and replicated the write before its answer was lost:
            // calling it failed would be wrong as often as right.
            _ if timed_out(status)
                && let Some(unsure) = unsure =>
            {
                format!("node {addr} did not answer in time; {unsure}")
            }
            _ if timed_out(status) => format!("node {addr} did not answer in time"),
            // A failure of the connection, whatever code the transport gave it (a connection
            // that broke under a call comes as UNKNOWN): not something the node said.
            _ if failed_on_the_way(status) => {
                let reason = status_reason(status) + self.tls_hint(&status_reason(status));
                let refused =
                    status_reason(status) == std::io::ErrorKind::ConnectionRefused.to_string();
                match unsure {
                    Some(unsure) if !refused => {
                        format!("cannot reach node {addr} ({reason}); {unsure}")
                    }
                    _ => format!("cannot reach node {addr} ({reason})"),
                }
            }
            Code::NotFound | Code::InvalidArgument => status.message().to_string(),
            code => format!("{}: {}", code_name(code), status.message()),
        })
    }
}

/// A gRPC code as words: `failed precondition`, not tonic's sentence describing it.
fn code_name(code: Code) -> String {
    let mut name = String::new();
    for c in format!("{code:?}").chars() {
        if c.is_uppercase() && !name.is_empty() {
            name.push(' ');
        }
        name.push(c.to_ascii_lowercase());
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::PeerStatus;

    fn split(line: &str) -> Vec<String> {
        split_line(line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    #[test]
    fn a_put_value_is_kept_as_typed() {
        for (line, value) in [
            ("put k call me #1 fan", "call me #1 fan"),
            ("put k #x", "#x"),
            (r"put k a\d+", r"a\d+"),
            (r"put k C:\tmp\new", r"C:\tmp\new"),
            ("put k it's", "it's"),
            (r#"put k say "hi" now"#, r#"say "hi" now"#),
            ("put k two  spaces   kept  ", "two  spaces   kept"),
            (r#"put k "  padded  ""#, "  padded  "),
            (r#"put k 'say "hi"'"#, r#"say "hi""#),
            (r#"put k "a \"b\" \\ c\d""#, r#"a "b" \ c\d"#),
            ("put k 🦀 Grüße", "🦀 Grüße"),
            // Only spaces and tabs separate words.
            ("put k a\u{3000}b\u{a0}c", "a\u{3000}b\u{a0}c"),
            ("put\tk\tx\ty", "x\ty"),
        ] {
            assert_eq!(split(line), ["put", "k", value], "{line}");
        }
    }

    #[test]
    fn keys_and_other_words_may_be_quoted() {
        assert_eq!(split("put 'my key' v"), ["put", "my key", "v"]);
        assert_eq!(split(r#"get "my key""#), ["get", "my key"]);
        assert_eq!(split("get #tag"), ["get", "#tag"]);
        assert_eq!(split(r#"get """#), ["get", ""]);
        assert_eq!(split("  get   -q   k  "), ["get", "-q", "k"]);
        assert_eq!(split("put k"), ["put", "k"]);
        assert_eq!(split("# put k v"), Vec::<String>::new());
        assert_eq!(split("   "), Vec::<String>::new());
        assert_eq!(split("get a\u{3000}b"), ["get", "a\u{3000}b"]);
        assert_eq!(split("get 'a b'c\"d\""), ["get", "a bcd"]);
    }

    #[test]
    fn unclosed_or_partial_quotes_are_refused() {
        for (line, problem) in [
            (r#"put k "unclosed"#, r#"unclosed " quote"#),
            ("get 'unclosed", "unclosed ' quote"),
            ("put 'it's' v", "unclosed ' quote"),
            (
                r#"put k "a b" c"#,
                "a quoted value must be the whole value: quote all of it, or none of it",
            ),
            (
                r#"put k "Hello"!"#,
                "a quoted value must be the whole value: quote all of it, or none of it",
            ),
            (
                "put k 'it''s'",
                "a quoted value must be the whole value: quote all of it, or none of it",
            ),
        ] {
            assert_eq!(split_line(line), Err(problem.to_string()), "{line}");
        }
    }

    /// A call that changes something and got no answer may have taken effect: the output says
    /// so in the words of what it changes. A read says only that it got no answer.
    #[tokio::test]
    async fn a_call_left_unanswered_says_what_may_have_happened() {
        let client = Client::new("127.0.0.1:1", std::time::Duration::from_secs(1)).unwrap();
        let shell = Shell::new(client);
        let late = || Err(Status::deadline_exceeded("deadline"));
        let unanswered = "node 127.0.0.1:1 did not answer in time";
        assert_eq!(
            shell.write(late()).stderr,
            [format!(
                "error: {unanswered}; the write may or may not have been stored"
            )]
        );
        assert_eq!(
            shell.change(late()).stderr,
            [format!(
                "error: {unanswered}; the ring change may or may not have begun (see cluster)"
            )]
        );
        let read = shell.failure(&Status::deadline_exceeded("deadline"), None);
        assert_eq!(read.stderr, [format!("error: {unanswered}")]);
        let refused = Status::failed_precondition("the ring is changing");
        assert_eq!(
            shell.failure(&refused, None).stderr,
            ["error: failed precondition: the ring is changing"]
        );
    }

    #[test]
    fn a_code_is_named_in_words() {
        assert_eq!(code_name(Code::FailedPrecondition), "failed precondition");
        assert_eq!(code_name(Code::Unavailable), "unavailable");
        assert_eq!(code_name(Code::ResourceExhausted), "resource exhausted");
    }

    #[test]
    fn control_characters_are_escaped_and_nothing_else() {
        assert!(matches!(
            escape_controls("plain Grüße 🦀 C:\\tmp"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            escape_controls("a\nb\tc\rd\u{1b}]0;x\u{7}\u{9b}\u{7f}"),
            "a\\nb\\tc\\rd\\u{1b}]0;x\\u{7}\\u{9b}\\u{7f}"
        );
    }

    #[test]
    fn status_lines_name_every_peer_and_what_is_pending() {
        let status = NodeStatus {
            node_id: "node1".into(),
            keys: 3,
            tombstones: 1,
            log_bytes: 4096,
            data_dir: "/data/node1".into(),
            max_clock_offset_ms: 500,
            refusing_writes: "its clock is off".into(),
            replicas: 3,
            partitions: 1024,
            ring_version: 1,
            ring_state: "normal".into(),
            ring_phase: "settled".into(),
            ring_change: String::new(),
            peers: vec![
                PeerStatus {
                    address: "db2:5001".into(),
                    state: "up".into(),
                    last_contact_ms: Some(12),
                    clock_offset_ms: Some(-3),
                    replicated_writes: 40,
                    replicated_batches: 5,
                    ..PeerStatus::default()
                },
                PeerStatus {
                    address: "db3:5001".into(),
                    state: "down".into(),
                    backlog: 7,
                    clock_offset_ms: Some(90_000_000),
                    resync_pending: true,
                    ..PeerStatus::default()
                },
                PeerStatus {
                    address: "db4:5001".into(),
                    state: "up".into(),
                    backlog: 1,
                    last_contact_ms: Some(3),
                    replicated_writes: 1,
                    replicated_batches: 1,
                    ..PeerStatus::default()
                },
                PeerStatus {
                    address: "db5:5001".into(),
                    state: "down".into(),
                    refuses: "the caller belongs to cluster 'other'".into(),
                    ..PeerStatus::default()
                },
            ],
        };
        assert_eq!(
            render_status(&status),
            [
                "node node1: 3 keys, 1 tombstone, log 4096 bytes, data in /data/node1",
                "refusing writes: its clock is off",
                "peer db2:5001: up, 40 writes replicated in 5 batches, last contact 12ms ago, \
                 clock -3ms",
                "peer db3:5001: down, 7 writes queued for handoff, resync pending, never \
                 contacted, clock +1day 1h (past the bound)",
                "peer db4:5001: up, 1 write queued for handoff, 1 write replicated in 1 batch, \
                 last contact 3ms ago",
                "peer db5:5001: down, refuses this node: the caller belongs to cluster 'other'",
            ]
        );
    }

    #[test]
    fn a_node_of_a_ring_says_what_share_it_holds() {
        let mut status = NodeStatus {
            node_id: "node1".into(),
            keys: 5,
            data_dir: "/d".into(),
            replicas: 3,
            partitions: 512,
            ..NodeStatus::default()
        };
        let lines = render_status(&status);
        assert_eq!(
            lines[1],
            "holds 512 of 1024 partitions (3 copies of each key)"
        );
        // Every partition, or a node that does not report them: nothing to say.
        for partitions in [1024, 0] {
            status.partitions = partitions;
            assert_eq!(render_status(&status).len(), 1);
        }
        // A change under way: the ring's version and phase, and what the change waits for.
        status.partitions = 512;
        status.ring_version = 2;
        status.ring_phase = "pending".into();
        status.ring_state = "normal".into();
        status.ring_change = "ring version 2: n5:1 joins; pending until ...".into();
        assert_eq!(
            render_status(&status)[2..],
            [
                "ring version 2 (pending), this node normal",
                "changing: ring version 2: n5:1 joins; pending until ...",
            ]
        );
    }
}

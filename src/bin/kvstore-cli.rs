//! `kvstore-cli`: the REPL. Interactive with line editing and history on a terminal; reads
//! commands from stdin without a prompt otherwise; runs one command when given one.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kvstore::client::Client;
use kvstore::shell::{Output, Shell};
use rustyline::error::ReadlineError;

/// Talk to a kvstore node.
///
/// `kvstore-cli 5001` opens a REPL on 127.0.0.1:5001 (`> put name Adnan`); `kvstore-cli 5001 get
/// name` runs one command and exits non-zero if it failed; `echo 'list' | kvstore-cli 5001` runs
/// commands from stdin.
#[derive(Debug, Parser)]
#[command(name = "kvstore-cli", version, about, long_about)]
struct Args {
    /// The node, as host:port (instead of the first positional argument).
    #[arg(long, value_name = "HOST:PORT")]
    addr: Option<String>,

    /// Talk TLS to the node, whose certificate must chain to this CA (PEM).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,

    /// This client's certificate (PEM), for a node that requires one (--tls-client-auth
    /// require).
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,

    /// The cluster's token file (the nodes' --cluster-token-file): `leave` and `remove`
    /// change the ring, and a node with a token takes them only with it.
    #[arg(long, value_name = "FILE")]
    cluster_token_file: Option<std::path::PathBuf>,

    /// How long to wait for each call.
    #[arg(long, default_value = "5s", value_parser = kvstore::config::at_least_1ms)]
    timeout: Duration,

    /// The node (a port on 127.0.0.1, or host:port) unless --addr is given, then optionally one
    /// command to run, e.g. `get name`.
    #[arg(
        value_name = "NODE [COMMAND]",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    args: Vec<String>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Success unless a command failed.
fn status(failed: bool) -> ExitCode {
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (node, command) = match args.addr {
        Some(addr) => (addr, args.args),
        None => {
            let mut rest = args.args.into_iter();
            let node = rest.next().context(
                "give the node to talk to: kvstore-cli 5001, or kvstore-cli --addr host:port",
            )?;
            (node, rest.collect())
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _guard = runtime.enter();
    let tls = match &args.tls_ca {
        None => None,
        Some(ca) => {
            let identity = (args.tls_cert.as_deref()).zip(args.tls_key.as_deref());
            Some(kvstore::tls::client_config(ca, identity)?)
        }
    };
    let token = (args.cluster_token_file.as_deref())
        .map(kvstore::config::ClusterToken::read)
        .transpose()?;
    let client = Client::with_tls(&node, args.timeout, tls.as_ref())?.with_token(token.as_ref());
    let mut shell = Shell::new(client);

    if !command.is_empty() {
        // Already split by the user's shell: the words go through as they are.
        let output = runtime.block_on(shell.execute_words(&command));
        // Shown or not (a reader gone), the status says whether the command failed.
        print(&output)?;
        return Ok(status(output.failed));
    }
    let mut execute = |line: &str| runtime.block_on(shell.execute(line));
    if std::io::stdin().is_terminal() {
        interactive(&mut execute)?;
        return Ok(ExitCode::SUCCESS);
    }
    // A script: no prompt, every line runs even after a failure, the exit status tells.
    let mut failed = false;
    for (number, line) in std::io::stdin().lock().split(b'\n').enumerate() {
        let mut line = line?;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let Ok(line) = String::from_utf8(line) else {
            // Keys and values are UTF-8 on the wire: say which line, and go on.
            let _ = writeln!(
                std::io::stderr(),
                "error: line {} is not UTF-8; skipped",
                number + 1
            );
            failed = true;
            continue;
        };
        let output = execute(&line);
        failed |= output.failed;
        // The reader went away (`... | head -1`): nothing more can be shown, and the status
        // still says whether anything failed so far.
        if output.exit || print(&output)? == Printed::ReaderGone {
            break;
        }
    }
    Ok(status(failed))
}

fn interactive(execute: &mut impl FnMut(&str) -> Output) -> anyhow::Result<()> {
    let mut editor = rustyline::DefaultEditor::new()?;
    let history = std::env::var_os("HOME")
        .map(|home| std::path::Path::new(&home).join(".kvstore_cli_history"));
    if let Some(path) = &history {
        let _ = editor.load_history(path);
    }
    let ended = loop {
        match editor.readline("> ") {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                let output = execute(&line);
                match print(&output) {
                    Ok(Printed::Shown) if !output.exit => {}
                    Ok(_) => break Ok(()),
                    Err(e) => break Err(e.into()),
                }
            }
            // Ctrl-C abandons the line, as in a shell; Ctrl-D leaves.
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break Ok(()),
            Err(e) => break Err(e.into()),
        }
    };
    // Kept however the session ended.
    if let Some(path) = &history {
        let _ = editor.save_history(path);
    }
    ended
}

#[derive(Debug, PartialEq, Eq)]
enum Printed {
    Shown,
    /// Standard output is a closed pipe (`kvstore-cli 5001 list | head -1`).
    ReaderGone,
}

/// Results to stdout, problems to stderr. A closed stdout is not an error to report (nor a
/// panic, as `println!` would make it): the caller stops, its exit status unchanged.
fn print(output: &Output) -> std::io::Result<Printed> {
    let shown = (|| {
        let mut stdout = std::io::stdout().lock();
        for line in &output.stdout {
            writeln!(stdout, "{line}")?;
        }
        stdout.flush()
    })();
    let printed = match shown {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Printed::ReaderGone,
        other => other.map(|()| Printed::Shown)?,
    };
    // Problems go to stderr whatever became of stdout; if stderr is gone too, there is no one
    // left to tell.
    let mut stderr = std::io::stderr().lock();
    for line in &output.stderr {
        let _ = writeln!(stderr, "{line}");
    }
    Ok(printed)
}

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
        // The reader went away (`kvstore-cli 5001 list | head -1`): nothing left to say.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
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
    let mut shell = Shell::new(Client::new(&node, args.timeout)?);

    if !command.is_empty() {
        // Already split by the user's shell: the words go through as they are.
        let output = runtime.block_on(shell.execute_words(&command));
        print(&output)?;
        return Ok(if output.failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    let mut execute = |line: &str| -> std::io::Result<Output> {
        let output = runtime.block_on(shell.execute(line));
        print(&output)?;
        Ok(output)
    };
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
        let output = match String::from_utf8(line) {
            Ok(line) => execute(&line)?,
            Err(_) => {
                // Keys and values are UTF-8 on the wire: say which line, and go on.
                eprintln!("error: line {} is not UTF-8; skipped", number + 1);
                failed = true;
                continue;
            }
        };
        failed |= output.failed;
        if output.exit {
            break;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn interactive(execute: &mut impl FnMut(&str) -> std::io::Result<Output>) -> anyhow::Result<()> {
    let mut editor = rustyline::DefaultEditor::new()?;
    let history = std::env::var_os("HOME")
        .map(|home| std::path::Path::new(&home).join(".kvstore_cli_history"));
    if let Some(path) = &history {
        let _ = editor.load_history(path);
    }
    loop {
        match editor.readline("> ") {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                if execute(&line)?.exit {
                    break;
                }
            }
            // Ctrl-C abandons the line, as in a shell; Ctrl-D leaves.
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(path) = &history {
        let _ = editor.save_history(path);
    }
    Ok(())
}

/// Results to stdout, problems to stderr. A closed stdout is an error (not a panic, as
/// `println!` would make it), which `main` ends on quietly.
fn print(output: &Output) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    for line in &output.stdout {
        writeln!(stdout, "{line}")?;
    }
    stdout.flush()?;
    let mut stderr = std::io::stderr().lock();
    for line in &output.stderr {
        writeln!(stderr, "{line}")?;
    }
    Ok(())
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

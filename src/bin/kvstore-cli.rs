//! `kvstore-cli`: the REPL. Interactive with line editing and history on a terminal; reads
//! commands from stdin without a prompt otherwise; runs one command when given one.

use std::io::{BufRead, IsTerminal};
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
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
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
    let mut execute = |line: &str| {
        let output = runtime.block_on(shell.execute(line));
        print(&output);
        output
    };

    if !command.is_empty() {
        let output = execute(&shell_words::join(&command));
        return Ok(if output.failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    if std::io::stdin().is_terminal() {
        interactive(&mut execute)?;
        return Ok(ExitCode::SUCCESS);
    }
    // A script: no prompt, every line runs even after a failure, the exit status tells.
    let mut failed = false;
    for line in std::io::stdin().lock().lines() {
        let output = execute(&line?);
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

fn interactive(execute: &mut impl FnMut(&str) -> Output) -> anyhow::Result<()> {
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
                if execute(&line).exit {
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

fn print(output: &Output) {
    for line in &output.stdout {
        println!("{line}");
    }
    for line in &output.stderr {
        eprintln!("{line}");
    }
}

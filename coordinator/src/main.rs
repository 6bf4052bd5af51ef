//! `lightrnn`: parse, install logging, start the runtime and the signal handlers, run the
//! command, print its result.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use lightrnn_coordinator::cli::{Cli, LogFormat, run};
use lightrnn_coordinator::signals::stop_on_signals;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("LIGHTRNN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        // A closed stderr (`| head`, `| tee` ended by the same Ctrl-C, a terminal gone)
        // must not end training before its checkpoint: a log line that cannot be
        // written is dropped, never reported with a panicking `eprintln!`.
        .log_internal_errors(false);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say_err(format_args!("error: cannot start the I/O runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let stop = stop_on_signals(
        rt.handle(),
        Duration::from_secs(cli.grace_s),
        cli.command.on_stop(),
    );
    match run(&cli, rt.handle(), &stop) {
        Ok(out) => {
            // The work is done and saved: a reader that went away (`| head`) does not
            // turn it into a failure.
            let mut o = std::io::stdout().lock();
            let _ = writeln!(o, "{out}").and_then(|()| o.flush());
            ExitCode::SUCCESS
        }
        Err(e) => {
            // The messages quote input clipped where they are made; this bounds any
            // line that still carries hostile input whole.
            let text = e.to_string();
            let lines: Vec<_> = text
                .lines()
                .map(|l| lightrnn_core::clip_at(l, 1000))
                .collect();
            say_err(format_args!("error: {}", lines.join("\n")));
            ExitCode::FAILURE
        }
    }
}

/// One line on stderr, or nothing where stderr is closed.
fn say_err(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

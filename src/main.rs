//! The `upcase` binary: parse flags, validate them into a config, dispatch.

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use upcase::bench;
use upcase::cli::{BenchCommand, Cli, Command};
use upcase::client::{self, exit};
use upcase::server;

fn main() {
    let cli = parse_args();
    init_logging(cli.verbose, cli.quiet);
    let result = match cli.command {
        Command::Serve(args) => {
            // First: the default --max-conns follows the raised limit.
            server::raise_fd_limit();
            match args.into_config() {
                Ok(cfg) => server::run(cfg).map(|()| exit::OK),
                Err(msg) => usage_error(&msg),
            }
        }
        Command::Send(args) => match args.into_config() {
            Ok(cfg) => client::send(&cfg).map(|o| o.exit_code()),
            Err(msg) => usage_error(&msg),
        },
        Command::Chat(args) => client::chat::run(&args.into_config()).map(|o| o.exit_code()),
        Command::Bench(args) => match args.into_config() {
            Ok(cmd) => {
                server::raise_fd_limit();
                bench_main(cmd)
            }
            Err(msg) => usage_error(&msg),
        },
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("upcase: {e:#}");
            exit::ERROR
        }
    };
    std::process::exit(code);
}

fn bench_main(cmd: BenchCommand) -> anyhow::Result<i32> {
    let errors = match cmd {
        BenchCommand::One(cfg, json) => {
            let report = bench::run(&cfg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                report.print();
            }
            report.errors
        }
        BenchCommand::Compare(cfg, json) => {
            let rows = bench::compare::run(&cfg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", bench::compare::table(&rows, &cfg.workloads));
            }
            if let Some(dir) = &cfg.out {
                bench::compare::write_out(dir, &rows, &cfg.workloads)?;
            }
            rows.iter().flat_map(|r| &r.reports).map(|r| r.errors).sum()
        }
    };
    Ok(if errors > 0 { exit::MISMATCH } else { exit::OK })
}

/// Parses the command line. `--help` and `--version` print as clap makes
/// them; an invalid argument gives one line that says what is wrong and
/// where to look, and exit code 2.
fn parse_args() -> Cli {
    use clap::error::ErrorKind;
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            // clap's first paragraph (the error and its details), as one line.
            let text = e.to_string();
            let para: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let joined = para.join(" ");
            let first = joined.strip_prefix("error: ").unwrap_or(&joined);
            let command = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
            let help = match command {
                Some(c) if ["serve", "send", "chat", "bench"].contains(&c.as_str()) => {
                    format!("upcase {c} --help")
                }
                _ => "upcase --help".to_string(),
            };
            eprintln!("upcase: {first} (see {help})");
            std::process::exit(exit::USAGE);
        }
    }
}

fn usage_error(msg: &str) -> ! {
    eprintln!("upcase: {msg}");
    std::process::exit(exit::USAGE);
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (_, 0) => "info",
        (_, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("UPCASE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

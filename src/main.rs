//! The `upcase` binary: parse flags, validate them into a config, dispatch.

use std::io::IsTerminal;

use clap::{CommandFactory, Parser};
use tracing_subscriber::EnvFilter;
use upcase::bench;
use upcase::cli::{BenchCommand, Cli, Command};
use upcase::client::{self, exit};
use upcase::server;

fn main() {
    let cli = parse_args();
    init_logging(cli.verbose, cli.quiet);
    // A client's output may be cut short by its reader; a server's
    // `listening` lines may not (the script reading them must see a failure).
    let client = matches!(cli.command, Command::Send(_) | Command::Chat(_));
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
        Command::Chat(args) => match args.into_config() {
            Ok(cfg) => client::chat::run(&cfg).map(|o| o.exit_code()),
            Err(msg) => usage_error(&msg),
        },
        Command::Man => print_man(),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "upcase", &mut std::io::stdout());
            Ok(exit::OK)
        }
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
        // The reader of our output went away (`upcase send ... | head -1`):
        // it has what it wanted. Quiet, and success, as cat's and nc's
        // users expect (and ripgrep does).
        Err(e) if client && stdout_closed(&e) => exit::OK,
        Err(e) => {
            eprintln!("upcase: {e:#}");
            exit::ERROR
        }
    };
    std::process::exit(code);
}

/// Exit codes as `bench --help` documents them: 1 when a server would not
/// start, 4 when a reply was wrong or a connection got none, else 0.
fn bench_main(cmd: BenchCommand) -> anyhow::Result<i32> {
    let errors = match cmd {
        BenchCommand::HoldShard(cfg, first_source) => {
            bench::hold::shard(&cfg, first_source)?;
            0
        }
        BenchCommand::One(cfg, json) => {
            let report = bench::run(&cfg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                report.print();
            }
            report.errors + report.unserved() as u64
        }
        BenchCommand::Compare(cfg, json) if cfg.sweep => {
            let (points, failed) = bench::sweep::run(&cfg);
            if json {
                println!("{}", serde_json::to_string_pretty(&points)?);
            } else {
                print!("{}", bench::sweep::table(&points));
            }
            if let Some(dir) = &cfg.out {
                bench::sweep::write_out(dir, &points)?;
            }
            if !failed.is_empty() {
                eprintln!(
                    "upcase: {} would not start: {}",
                    failed.len(),
                    failed.join(", ")
                );
                return Ok(exit::ERROR);
            }
            points.iter().map(|p| p.errors).sum()
        }
        BenchCommand::Compare(cfg, json) => {
            let comparison = bench::compare::run(&cfg)?;
            let rows = comparison.rows;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", bench::compare::table(&rows, &cfg.workloads));
            }
            if let Some(dir) = &cfg.out {
                bench::compare::write_out(dir, &rows, &cfg.workloads)?;
            }
            if !comparison.failed.is_empty() {
                eprintln!(
                    "upcase: {} would not start: {}",
                    comparison.failed.len(),
                    comparison.failed.join(", ")
                );
                return Ok(exit::ERROR);
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

/// The man page, from the same clap definition as --help: one for upcase
/// and a section per command, so `man upcase` shows every flag.
fn print_man() -> anyhow::Result<i32> {
    use std::io::Write;
    let cmd = Cli::command();
    let mut out = std::io::stdout().lock();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !["man", "completions"].contains(&s.get_name()))
    {
        let name = format!("upcase-{}", sub.get_name());
        let sub = sub.clone().bin_name(format!("upcase {}", sub.get_name()));
        writeln!(out, ".SH \"{}\"", name.to_uppercase())?;
        let mut page = Vec::new();
        clap_mangen::Man::new(sub).render(&mut page)?;
        // Keep the command's sections, without a second title header.
        let text = String::from_utf8_lossy(&page);
        for line in text
            .lines()
            .filter(|l| !l.starts_with(".TH") && !l.starts_with(".ie") && !l.starts_with(".el"))
        {
            let line = line
                .strip_prefix(".SH ")
                .map_or(line.to_string(), |h| format!(".SS {h}"));
            writeln!(out, "{line}")?;
        }
    }
    Ok(exit::OK)
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
    // A worker of `serve --processes` says which one it is on each line.
    // After a restart, its generation too.
    let prefix = match (
        upcase::server::handoff::role(),
        upcase::server::handoff::generation(),
    ) {
        (upcase::server::handoff::Role::Worker(n), 1) => format!("worker {n}: "),
        (upcase::server::handoff::Role::Worker(n), g) => format!("worker {n} of generation {g}: "),
        (upcase::server::handoff::Role::Main, 1) => String::new(),
        (upcase::server::handoff::Role::Main, g) => format!("generation {g}: "),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Prefixed(prefix))
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// Whether `e` is a write to stdout that failed because its reader closed
/// the pipe.
fn stdout_closed(e: &anyhow::Error) -> bool {
    let broken = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    broken && e.chain().any(|c| c.to_string() == "writing to stdout")
}

/// Log lines to stderr, each written whole after a prefix.
struct Prefixed(String);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Prefixed {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            prefix: &self.0,
            buf: Vec::new(),
        }
    }
}

/// One log line, written to stderr when dropped.
struct Line<'a> {
    prefix: &'a str,
    buf: Vec<u8>,
}

impl std::io::Write for Line<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        use std::io::Write;
        let mut line = Vec::with_capacity(self.prefix.len() + self.buf.len());
        line.extend_from_slice(self.prefix.as_bytes());
        line.extend_from_slice(&self.buf);
        let _ = std::io::stderr().lock().write_all(&line);
    }
}

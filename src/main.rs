use dcmigrate::cli::Cmd;
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = dcmigrate::cli::parse();
    // Daemons log what they do; client commands stay quiet unless asked.
    let default = match cli.cmd {
        Cmd::Agent(_) | Cmd::Guest(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: agents' logs usually go to files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match dcmigrate::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

//! The `iothub` binary: parses the command line and hands over to [`iothub::cli`].

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match iothub::cli::main().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! The `iothub` binary: parses the command line and hands over to [`iothub::cli`].

// Hook decisions allocate small, short-lived buffers at a high rate; mimalloc measurably beats glibc's
// allocator there (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

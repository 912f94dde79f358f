//! sagactl, the command-line client of sagad: see [`sagad::cli`].

fn main() -> std::process::ExitCode {
    sagad::cli::main()
}

fn main() -> std::process::ExitCode {
    clinicsync::cli::main()
}

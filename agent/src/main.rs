fn main() -> std::process::ExitCode {
    kspan::cli::main()
}

fn main() -> std::process::ExitCode {
    microseg::cli::main()
}

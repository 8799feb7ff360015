//! Generates the tonic peer's gRPC code with a vendored `protoc`: no system package needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .bytes(".echo.Payload.data")
        .compile_with_config(config, &["proto/echo.proto"], &["proto"])?;
    Ok(())
}

pub mod issuer;
pub mod keystore;

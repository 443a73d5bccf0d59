pub mod scratch;

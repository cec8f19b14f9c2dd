pub mod numa; pub mod hip;

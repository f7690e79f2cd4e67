"""Generated code of the pdlb.v1 protobuf contract (`make proto`). Do not edit."""

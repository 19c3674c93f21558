from rlhf_mesh.cli import main

main()

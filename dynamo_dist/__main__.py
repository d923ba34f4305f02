from dynamo_dist.tools.cli import main

main()

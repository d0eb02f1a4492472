from ttt_speech.cli import main

main()

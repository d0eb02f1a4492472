from ttt_speech.codec.commands import main

raise SystemExit(main())

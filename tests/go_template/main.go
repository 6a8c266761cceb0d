// Renders the TEMPLATE of an Ollama Modelfile with Go's text/template, the engine Ollama runs
// templates with, on conversations read as JSON from stdin; prints the rendered texts as JSON.
// Used by tests/test_ollama_template.py.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	modelfile, _ := os.ReadFile(os.Args[1])
	text := string(modelfile)
	start := strings.Index(text, "TEMPLATE \"\"\"") + len("TEMPLATE \"\"\"")
	end := strings.Index(text[start:], "\"\"\"") + start
	tmpl := template.Must(template.New("t").Parse(text[start:end]))
	var conversations [][]Message
	json.NewDecoder(os.Stdin).Decode(&conversations)
	var outputs []string
	for _, messages := range conversations {
		var b strings.Builder
		if err := tmpl.Execute(&b, map[string]any{"Messages": messages}); err != nil {
			panic(err)
		}
		outputs = append(outputs, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(outputs)
}
